"""The command layer: parse options, call the library, render results, map errors."""
