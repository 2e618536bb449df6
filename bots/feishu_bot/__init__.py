"""feishu-bot: receives Feishu (Lark) event callbacks and records each event exactly once
(design seed 000: the Feishu bot's database layer, on the shared data layer)."""

# The settings this code needs (read with shared.setting: NAME or NAME_FILE); provisioning
# reads this constant without importing the bot: provision config set NAME FEISHU_VERIFICATION_TOKEN=...
REQUIRED_SETTINGS = ("FEISHU_VERIFICATION_TOKEN",)
