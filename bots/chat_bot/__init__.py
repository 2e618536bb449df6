"""chat-bot: persistent conversations for an LLM chat (design seeds 001 and 003).

    from bots.chat_bot.models import ChatBase, Conversation, Message, FileMetadata
    from bots.chat_bot.repository import ConversationRepository, FileRepository
    from bots.chat_bot.api import create_app          # needs fastapi
"""

REQUIRED_SETTINGS: tuple[str, ...] = ()  # chat-bot needs no setting of its own (HOST/PORT are optional)
