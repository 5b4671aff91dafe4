"""What differs between the model families chatglm.cpp runs, chosen from the file's ModelType:
the chat template, the tool-call format (if the family has one), how the answer starts (a metadata
line or not), how token ids become text, and whether the model reads images.

ChatGLM3 and GLM-4 share a turn-based template (``<|role|>metadata\\n content``) and differ in
their tokenizer (sentencepiece vs byte-level BPE) and tool format; ChatGLM2 has no roles at all,
only ``[Round N]\\n\\n问：...\\n\\n答：...`` text.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from backends.base import Message, Tool, ToolCall, ToolsNotSupported
from backends.chatglm import chatglm3_tools, glm4_tools
from backends.chatglm.ggml_file import CHATGLM2, CHATGLM3, CHATGLM4, CHATGLM4V

Encode = Callable[[str], list[int]]  # ordinary text -> ids (no special tokens)
TURN_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "observation"}


@dataclass(frozen=True)
class ToolFormat:
    system_prompt: Callable[[tuple[Tool, ...]], str]
    render_call: Callable[[ToolCall], str]
    parse_call: Callable[[str, str], ToolCall | None]


CHATGLM3_TOOLS = ToolFormat(chatglm3_tools.tools_system_prompt, chatglm3_tools.render_call, chatglm3_tools.parse_call)
GLM4_TOOLS = ToolFormat(glm4_tools.tools_system_prompt, glm4_tools.render_call, glm4_tools.parse_call)


@dataclass(frozen=True)
class Family:
    name: str
    prefix: tuple[str, str]  # the special tokens every prompt starts with
    tools: ToolFormat | None  # None: the family cannot call tools (a 400)
    metadata_line: bool  # an answer's first line is metadata (empty, or a tool's name)
    byte_level: bool  # byte-level BPE (pieces may split a UTF-8 character) rather than sentencepiece
    turns: bool = True  # role-token turns; False: ChatGLM2's "[Round N]" text
    images: bool = False
    image_marker: tuple[str, ...] = ()  # where an image goes in the text; its pixels go in beside

    def encode_chat(self, messages: tuple[Message, ...], tools: tuple[Tool, ...], encode: Encode,
                    special: dict[str, int], image_turn: int | None = None) -> list[int]:
        """The prompt ids of a chat; ``image_turn``: the index of the message that carries the image."""
        if tools and self.tools is None:
            raise ToolsNotSupported(f"{self.name} models cannot call tools; send the request without tools",
                                 param="tools")
        ids = [special[t] for t in self.prefix]
        if not self.turns:
            return ids + encode(chatglm2_text(messages))

        def turn(role: str, content: str, metadata: str = "", image: bool = False) -> None:
            ids.append(special[f"<|{role}|>"])
            ids.extend(encode(metadata + "\n"))
            if image:
                ids.extend(special[t] for t in self.image_marker)
            ids.extend(encode(content))

        if tools and self.tools is not None:
            turn("system", self.tools.system_prompt(tools))
        for i, m in enumerate(messages):
            if m.role == "assistant" and m.tool_calls and self.tools is not None:
                if m.content:
                    turn("assistant", m.content)
                for call in m.tool_calls:
                    turn("assistant", self.tools.render_call(call), metadata=call.name)
            else:
                turn(TURN_ROLES[m.role], m.content, image=i == image_turn)
        ids.append(special["<|assistant|>"])
        return ids


def chatglm2_text(messages: tuple[Message, ...]) -> str:
    """ChatGLM2's rounds, as chatglm.cpp's apply_chat_template writes them for alternating user and
    assistant turns. ChatGLM2 has no system or tool role: a system message's text goes in front of
    the next user turn; turns of one speaker in a row are joined by a blank line."""
    if any(m.role == "tool" or m.tool_calls for m in messages):
        raise ToolsNotSupported("ChatGLM2 models cannot call tools: the chat has tool calls or tool results",
                             param="messages")
    rounds: list[tuple[str, str]] = []  # (question, answer)
    question: list[str] = []
    for m in messages:
        if m.role in ("system", "user"):
            question.append(m.content)
        elif question or not rounds:  # the answer to the question so far
            rounds.append(("\n\n".join(question), m.content))
            question = []
        else:  # two assistant turns in a row
            asked, answer = rounds[-1]
            rounds[-1] = (asked, answer + "\n\n" + m.content)
    done = "".join(f"[Round {n}]\n\n问：{q}\n\n答：{a}\n\n" for n, (q, a) in enumerate(rounds, 1))
    asked = "\n\n".join(question)
    return done + f"[Round {len(rounds) + 1}]\n\n问：{asked}\n\n答："


FAMILIES = {
    CHATGLM2: Family("ChatGLM2", ("[gMASK]", "sop"), tools=None, metadata_line=False, byte_level=False, turns=False),
    CHATGLM3: Family("ChatGLM3", ("[gMASK]", "sop"), tools=CHATGLM3_TOOLS, metadata_line=True, byte_level=False),
    CHATGLM4: Family("GLM-4", ("[gMASK]", "<sop>"), tools=GLM4_TOOLS, metadata_line=True, byte_level=True),
    CHATGLM4V: Family("GLM-4V", ("[gMASK]", "<sop>"), tools=GLM4_TOOLS, metadata_line=True, byte_level=True,
                      images=True, image_marker=("<|begin_of_image|>", "<|endoftext|>", "<|end_of_image|>")),
}
