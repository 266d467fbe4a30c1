"""Models: reward heads and scoring, roles on a shared base, the embedded default, aliases, cards."""
