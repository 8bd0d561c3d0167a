"""Entry points (console scripts) of the shoalmq package."""
