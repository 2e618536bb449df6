"""The fleet's bots: one package per bot code, each with its own models, repository and entry point."""
