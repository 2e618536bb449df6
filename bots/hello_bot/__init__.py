"""hello-bot: a Telegram bot that remembers its users and greets them (design seed 002)."""
