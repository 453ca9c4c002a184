"""The demo world: synthetic domains with exact checkers, and source models trained on them from scratch."""
