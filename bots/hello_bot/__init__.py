"""hello-bot: a Telegram bot that remembers its users and greets them (design seed 002)."""

# The settings this code needs (read with shared.setting: BOT_TOKEN or BOT_TOKEN_FILE);
# provisioning reads this constant without importing the bot: provision config set NAME BOT_TOKEN=...
REQUIRED_SETTINGS = ("BOT_TOKEN",)
