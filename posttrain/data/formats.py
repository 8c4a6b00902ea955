"""Record formats: which fields a record has, and how ShareGPT and Alpaca records become chats.

| format | fields | trained as |
|---|---|---|
| `messages` | `messages: [{role, content}]`, `tools`? | the chat, loss on assistant turns |
| `sharegpt` | `conversations: [{from, value}]`, `system`?, `tools`? | the same chat, roles mapped (below) |
| `alpaca` | `instruction`, `input`?, `output`, `system`?, `history`? | user: instruction + "\\n" + input; assistant: output |
| `prompt_completion` | `prompt`, `completion` | loss on the completion |
| `text` | `text` | loss on every token |

`auto` picks per record, in this order: `messages`, `conversations` (sharegpt), `instruction`
(alpaca), `prompt`, `text`. ShareGPT and Alpaca records are converted to `messages` here and then
rendered by the tokenizer's own chat template like any chat (a model without one needs
`model.chat_template`). The conversions follow LLaMA-Factory's, the common source of such data.
"""

from __future__ import annotations

import json

FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion", "text")

# ShareGPT speaker names (`from`) -> chat roles. `function_call` is the assistant calling a tool (its
# value is the call as text); `observation` is the tool's answer.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bard": "assistant", "bing": "assistant",
    "model": "assistant", "function_call": "assistant",
    "tool": "tool", "observation": "tool", "function": "tool", "function_response": "tool", "ipython": "tool",
}


class FormatError(ValueError):
    """A record does not fit its format; `reason` is the bad-record counter it is counted under."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def detect(rec: dict) -> str:
    """The format of a record under `format: auto`."""
    for key, fmt in (("messages", "messages"), ("conversations", "sharegpt"), ("instruction", "alpaca"),
                     ("prompt", "prompt_completion"), ("text", "text")):
        if key in rec:
            return fmt
    keys = ", ".join(sorted(rec)) or "none"
    raise FormatError("missing_field", "record has none of 'messages', 'conversations' (sharegpt), 'instruction'+'output' (alpaca), "
                      f"'prompt'+'completion', 'text' (keys: {keys})")


def normalize(rec: dict, fmt: str) -> tuple[str, dict]:
    """(messages | prompt_completion | text, record): ShareGPT and Alpaca records become `messages`."""
    if fmt == "auto":
        fmt = detect(rec)
    if fmt == "sharegpt":
        return "messages", sharegpt_to_messages(rec)
    if fmt == "alpaca":
        return "messages", alpaca_to_messages(rec)
    return fmt, rec


def _tools(rec: dict):
    tools = rec.get("tools")
    if isinstance(tools, str):  # LLaMA-Factory keeps the tool list as a JSON string
        try:
            tools = json.loads(tools) if tools.strip() else None
        except ValueError as e:
            raise FormatError("wrong_type", f"'tools' is a string but not JSON ({e})") from None
    if tools is not None and not isinstance(tools, list):
        raise FormatError("wrong_type", f"'tools' must be a list of tool schemas, got {type(tools).__name__}")
    return tools


def sharegpt_to_messages(rec: dict) -> dict:
    conv = rec.get("conversations")
    if conv is None:
        raise FormatError("missing_field", "sharegpt record needs 'conversations': [{from, value}, ...]")
    if not isinstance(conv, list) or not conv:
        raise FormatError("wrong_type", "'conversations' must be a non-empty list of {from, value} objects")
    messages = []
    for i, turn in enumerate(conv):
        if not isinstance(turn, dict):
            raise FormatError("wrong_type", f"conversations[{i}] must be an object with 'from' and 'value'")
        speaker, value = (turn.get("from"), turn.get("value")) if "from" in turn else (turn.get("role"), turn.get("content"))
        if not isinstance(speaker, str):
            raise FormatError("missing_field" if speaker is None else "wrong_type", f"conversations[{i}] has no string 'from'")
        role = SHAREGPT_ROLES.get(speaker.lower())
        if role is None:
            raise FormatError("wrong_type", f"conversations[{i}].from {speaker!r} is not a ShareGPT role (known: {', '.join(SHAREGPT_ROLES)})")
        if not isinstance(value, str):
            raise FormatError("missing_field" if value is None else "wrong_type", f"conversations[{i}].value must be a string")
        messages.append({"role": role, "content": value})
    system = rec.get("system")
    if system is not None and not isinstance(system, str):
        raise FormatError("wrong_type", f"'system' must be a string, got {type(system).__name__}")
    if system and messages[0]["role"] != "system":  # a top-level system prompt (LLaMA-Factory's `system` column)
        messages.insert(0, {"role": "system", "content": system})
    out = {"messages": messages}
    if (tools := _tools(rec)) is not None:
        out["tools"] = tools
    return out


def alpaca_to_messages(rec: dict) -> dict:
    fields = {}
    for key, required in (("instruction", True), ("input", False), ("output", True), ("system", False)):
        v = rec.get(key)
        if v is None and required:
            raise FormatError("missing_field", f"alpaca record needs 'instruction' and 'output' (missing {key!r})")
        if v is not None and not isinstance(v, str):
            raise FormatError("wrong_type", f"alpaca {key!r} must be a string, got {type(v).__name__}")
        fields[key] = v or ""
    messages = [{"role": "system", "content": fields["system"]}] if fields["system"] else []
    history = rec.get("history") or []
    if not isinstance(history, list) or not all(isinstance(h, (list, tuple)) and len(h) == 2 and all(isinstance(x, str) for x in h) for h in history):
        raise FormatError("wrong_type", "alpaca 'history' must be a list of [instruction, response] string pairs")
    for q, a in history:
        messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    prompt = "\n".join(x for x in (fields["instruction"], fields["input"]) if x)
    messages += [{"role": "user", "content": prompt}, {"role": "assistant", "content": fields["output"]}]
    return {"messages": messages}
