"""Chat text for Gradio: user and model text always shown as typed, answers with their notes and images."""
from __future__ import annotations

import re


def code(text: str) -> str:
    """Inline code for Markdown (its content is shown literally)."""
    return "`" + str(text).replace("`", "'") + "`"


# ---- text shown as text ---------------------------------------------------------------------------
# Fenced code blocks and inline code spans: Markdown shows their content literally already.
# (A misjudged boundary is harmless: text taken for code reaches the chatbot's HTML sanitizer.)
_CODE = re.compile(r"^ {0,3}(`{3,}|~{3,})[^\n]*\n.*?(?:^ {0,3}\1[ \t]*$|\Z)"      # fenced block
                   r"|(`+)(?!`)(?:(?!\n[ \t]*\n).)+?(?<!`)\2(?!`)", re.M | re.S)  # span, within a paragraph


def literal(text: str) -> str:
    """Text for the chat's Markdown renderer with every HTML tag shown as typed, never interpreted.

    Outside code, `&` and `<` become entities (and `![` loses its image meaning, so no remote picture is
    fetched). The chatbot's own HTML sanitizer stays on as a second line of defence.
    """
    out, last = [], 0
    for m in _CODE.finditer(text or ""):
        out += [_escape(text[last:m.start()]), m.group(0)]
        last = m.end()
    out.append(_escape((text or "")[last:]))
    return "".join(out)


def _escape(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace("![", "!\\[")


_TAG = re.compile(r"</?h>")


def split_image_prompt(answer: str, *, asked: bool) -> tuple[str, str | None]:
    """(the text to show, the image prompt the model wrote or None).

    Only a turn that asked for an image (`asked`) has an image prompt: there, the text from the first `<h>` to
    the last `</h>` is the prompt (an unclosed `<h>`, of an answer still streaming or stopped, counts: its text
    so far is the prompt) and no tag is shown raw. Any other answer is shown exactly as written, `<h>` and all
    (a model explaining HTML)."""
    answer = answer or ""
    if not asked:
        return answer.strip(), None
    start, end = answer.find("<h>"), answer.rfind("</h>")
    if start < 0:
        return _TAG.sub("", answer).strip(), None
    inside = answer[start:end] if end > start else answer[start:]  # from the first <h> to the last </h>
    after = answer[end + len("</h>"):] if end > start else ""
    prompt = " ".join(_TAG.sub(" ", inside).split())
    return _TAG.sub("", answer[:start] + after).strip(), prompt or None


def _text(markdown: str) -> dict:
    # A text part given as a dict: Gradio would run a plain string through inspect.cleandoc, which eats
    # the indentation of code in answers.
    return {"type": "text", "text": markdown}


def user_bubble(text: str, files: list, first: int) -> dict:
    content = [{"path": f, "alt_text": f"Image {first + k}"} for k, f in enumerate(files)]
    if text or not content:
        content.append(_text(literal(text)))
    return {"role": "user", "content": content}


def answer_messages(answer: str, notices: list, prompt: str | None, image_file: str | None,
                    progress=None, error: str | None = None, *, asked: bool) -> list[dict]:
    """One answer as chat messages: its text (an image prompt apart only when the turn `asked` for an image),
    its notes, an error, the drawing's progress and the drawn picture."""
    msgs = []
    shown, wrote = split_image_prompt(answer, asked=asked)
    parts = [literal(shown)] if shown.strip() else []
    if wrote and not (image_file or progress):  # a prompt with no picture (yet): shown as what it is
        parts.append(f"*Image prompt:* {literal(wrote)}")
    parts += [f"> *Note:* {literal(n)}" for n in notices]
    if error:
        parts.append(f"**Error:** {literal(error)}")
    if parts:
        msgs.append({"role": "assistant", "content": [_text("\n\n".join(parts))]})
    if progress is not None:
        text, fraction = progress
        msgs.append({"role": "assistant", "content": [_text(f"Image prompt: {literal(prompt or '')}")],
                     "metadata": {"title": f"{text} ({fraction:.0%})", "status": "pending"}})
    if image_file:
        msgs.append({"role": "assistant", "content": [{"path": image_file, "alt_text": prompt or "generated image"},
                                                      _text(f"**Image prompt:** {literal(prompt or '')}")]})
    return msgs


def render(session, ex, upto: int | None = None) -> list[dict]:
    """The chat as Gradio messages, from the engine's history (turns[:upto]) and the display state."""
    turns = session.turns[:upto]
    msgs, first = [], 1
    for i in range(len(turns) + 1):
        for f in ex.failed:
            if f.position == i:
                msgs += [user_bubble(f.user, f.files, first)] + answer_messages("", [], None, None, error=f.error,
                                                                                  asked=False)
        if i == len(turns):
            break
        t, v = turns[i], ex.views[i] if i < len(ex.views) else None
        files = [ex.show(im.image, im.key) for im in t.images]
        msgs.append(user_bubble(t.user, files, first))
        first += len(files)
        msgs += answer_messages(t.assistant or "", v.notices if v else [], t.image_prompt,
                                v.image_file if v else None, asked=t.want_image)
    return msgs
