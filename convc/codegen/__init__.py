"""Graph -> source text, per target."""
