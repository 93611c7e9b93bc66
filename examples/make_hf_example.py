"""A Hugging Face model to analyse offline: a small BERT classifier, trained here on padded
token sequences and written by ``save_pretrained``, and its training set as a token file.

    python examples/make_hf_example.py OUT   # writes OUT/bert-tiny/ and OUT/tokens.safetensors

The task: does a sequence (3 to 16 tokens of a 24-token vocabulary, right-padded to 16) hold
more 3s than 4s, fewer, or as many? Deterministic (fixed seeds, one thread); needs the ``hf``
extra (``pip install -e './plugins[hf]'``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

VOCAB, LENGTH, N, STEPS = 24, 16, 512, 300


def main(out: Path) -> None:
    import transformers

    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, LENGTH + 1, (N,), generator=g)
    mask = (torch.arange(LENGTH)[None] < lengths[:, None]).long()
    ids = torch.randint(1, VOCAB, (N, LENGTH), generator=g) * mask  # 0 pads
    more = (ids == 3).sum(1) - (ids == 4).sum(1)
    labels = torch.where(more > 0, 0, torch.where(more < 0, 1, 2))
    out.mkdir(parents=True, exist_ok=True)
    save_file({"input_ids": ids, "attention_mask": mask, "labels": labels},
              str(out / "tokens.safetensors"))

    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=LENGTH, type_vocab_size=1, num_labels=3,
        hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.0, pad_token_id=0,
    )
    model = transformers.BertForSequenceClassification(config)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(STEPS):
        batch = torch.randint(N, (64,), generator=g)
        logits = model(input_ids=ids[batch], attention_mask=mask[batch]).logits
        loss = torch.nn.functional.cross_entropy(logits, labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(input_ids=ids, attention_mask=mask).logits.argmax(1) == labels)
    model.save_pretrained(out / "bert-tiny")
    print(f"{out / 'bert-tiny'}: {sum(p.numel() for p in model.parameters()):,} parameters, "
          f"train accuracy {accuracy.float().mean():.3f} after {STEPS} Adam steps")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python examples/make_hf_example.py OUT")
    main(Path(sys.argv[1]))
