from __future__ import annotations

import pytest
from plugin_fixtures import fake_plugin  # noqa: F401

from subspace_cli.errors import PluginError, SecurityError
from subspace_cli.plugins import (
    DATA_GROUP,
    MODEL_GROUP,
    discover,
    import_from_spec,
    load_plugin,
    resolve_factory,
)


def test_discovery_lists_without_importing(fake_plugin):  # noqa: F811
    import sys

    models = discover(MODEL_GROUP)
    assert {"tiny", "broken"} <= set(models)
    assert models["tiny"].distribution == "fakeplug"
    assert models["tiny"].version == "1.0"
    assert models["broken"].value == "fakeplug_broken:factory"
    assert "fakeplug_mod" not in sys.modules
    assert "fakeplug_broken" not in sys.modules
    assert "toy" in discover(DATA_GROUP)


def test_builtins_are_registered_through_entry_points():
    assert {"mlp", "cnn", "transformer"} <= set(discover(MODEL_GROUP))
    assert {"mnist1d", "digits", "tensors"} <= set(discover(DATA_GROUP))
    assert discover(MODEL_GROUP)["mlp"].distribution == "subspace-plugins"


def test_broken_plugin_error_names_distribution_and_cause(fake_plugin):  # noqa: F811
    with pytest.raises(PluginError) as info:
        load_plugin(discover(MODEL_GROUP)["broken"])
    message = str(info.value)
    assert 'failed to load plugin "fakeplug[broken]"' in message
    assert "fakeplug_broken:factory" in message
    assert "fakeplug_missing_dependency" in message
    # the healthy plugin of the same distribution still loads
    assert resolve_factory("model", "tiny", from_user=False)(input_dim=4).in_features == 4


def test_unknown_plugin_lists_known(fake_plugin):  # noqa: F811
    with pytest.raises(PluginError, match='unknown model plugin "nope".*tiny'):
        resolve_factory("model", "nope", from_user=False)


def test_import_spec_refused_when_it_comes_from_metadata():
    with pytest.raises(SecurityError, match="refusing to import code named by a checkpoint"):
        resolve_factory("model", "os:system", from_user=False)


def test_import_spec_allowed_from_user(fake_plugin):  # noqa: F811
    factory = resolve_factory("model", "fakeplug_mod:tiny", from_user=True)
    assert factory(input_dim=5, num_classes=3).out_features == 3


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon_here", "must be in the form"),
        ("a:b:c", "must be in the form"),
        ("definitely_not_a_module_xyz:f", 'could not import module "definitely_not_a_module_xyz"'),
        (
            "fakeplug_mod:missing_attr",
            'attribute "missing_attr" not found in module "fakeplug_mod"',
        ),
        ("fakeplug_broken:factory", 'needs "fakeplug_missing_dependency", which is not installed'),
        ("fakeplug_mod:not_callable", "is not callable"),
    ],
)
def test_import_spec_messages_are_distinct(fake_plugin, spec, message):  # noqa: F811
    with pytest.raises(PluginError, match=message):
        import_from_spec(spec)
