"""Ready recipes; each is one readable file plus a YAML (see recipes/README.md). Copy one into your repo."""
