"""The adapter checkpoint format: layout, manifest, atomic writes, pruning, ZeRO gathering, export."""
