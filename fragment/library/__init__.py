"""The fragment library and sharing: index, prompt fingerprints, auto mode, unions, packs."""
