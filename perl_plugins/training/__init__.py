"""Training plumbing shared by the CLI and the recipes."""
