"""Moved: the chat templates belong to the processor (`mini_gemini.modeling.chat_template`). Kept so that scripts
importing `mini_gemini.chat.templates` keep working; `Turn` is the name `PromptTurn` had here."""
from ..modeling.chat_template import (  # noqa: F401
    TEMPLATES,
    Piece,
    Prompt,
    PromptTurn,
    Template,
    build_prompt,
    get_template,
    select_template,
    tokenize,
)

Turn = PromptTurn
