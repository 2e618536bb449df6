"""feishu-bot: receives Feishu (Lark) event callbacks and records each event exactly once
(design seed 000: the Feishu bot's database layer, on the shared data layer)."""
