"""The explorer's pages; each exposes ``render(run: RunDir)``."""
