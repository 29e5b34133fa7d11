"""Conversations for RAG: a follow-up question rewritten to stand alone, and the history packed
to a token budget. Pure functions over the history and two callables (count tokens; the chat
path, optional), so they are tested without a cluster.

    conv = prepare(question, history, settings.rag.conversation, count_tokens, generate)
    conv.standalone        # drives retrieval (and is reported in the diagnostics)
    conv.messages(...)     # the chat model's messages: summary + recent turns + context + question

Rewriting: with a chat model, a bounded prompted rewrite, checked (one line, not an answer, not
too long) and replaced by the heuristic when it fails; without one, the heuristic: a question
that leans on the conversation (a pronoun, "what about ...", too few terms of its own) gets the
key terms of the earlier questions it refers back to.

Packing: the newest `recent_turns` messages verbatim while they fit `history_tokens`; the older
ones summarised into what is left (by the chat model when configured, else extractively: each
turn's leading sentence, newest first, until the budget is spent).
"""

from __future__ import annotations

import inspect
import logging
import re
from dataclasses import dataclass, field
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field

log = logging.getLogger(__name__)

# Bounds of a request's history (the per-deployment ones are in rag.conversation settings).
MAX_HISTORY_MESSAGES = 200
MAX_HISTORY_CHARS = 32_000

CountTokens = Callable[[str], int]
Generate = Callable[..., str]


class HistoryMessage(BaseModel):
    """One earlier message of the conversation, oldest first."""

    model_config = ConfigDict(extra="forbid")

    role: Literal["user", "assistant"]
    content: str = Field(max_length=MAX_HISTORY_CHARS)


class ConversationDiagnostics(BaseModel):
    """What the conversation did to a query."""

    question: str = Field(description="The question as asked.")
    standalone_question: str = Field(description="The question retrieval used (rewritten to stand alone).")
    rewrite: Literal["model", "heuristic", "none"] = Field(description="Who rewrote it; none: it stood alone "
                                                           "or rewriting is off.")
    rewrite_fallback_reason: str | None = Field(None, description="Why the model's rewrite was not used.")
    history_messages: int = Field(description="Messages of history the query came with.")
    verbatim_messages: int = Field(description="Of those, the newest handed to the chat model as they are.")
    summarised_messages: int = Field(description="Older messages folded into the summary.")
    dropped_messages: int = Field(description="Oldest messages left out: the budget was spent.")
    summary: Literal["model", "extractive", "none"] = "none"
    history_tokens: int = Field(description="Tokens of the summary and the verbatim messages together.")
    thread: str | None = Field(None, description="The thread the history came from.")


# ------------------------------------------------------------------ terms and sentences

_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9_+.-]*[A-Za-z0-9+]|[A-Za-z0-9]")
_SENT = re.compile(r"(?<=[.!?])\s+(?=\S)")
_CITE = re.compile(r"\s*\[\d+(?:\s*,\s*\d+)*\]")
_STOP = set("""a an and are as at be been but by can could did do does for from had has have how i in into is
of on or should so than the then to was were what when where which who whom whose why will with would you your
we our us me my tell about please explain describe give show also more else much many any some other again
just only same like use used uses using get gets make makes there here yes ok okay thanks thank""".split())
# Words that refer back to something said before.
_ANAPHORA = set("""it its it's itself they them their theirs themselves this that these those he him his she her
hers one ones former latter such there""".split())
_FOLLOW_UP = re.compile(r"^\s*(and|but|also|or|so|then|what about|how about|and what|what else|why not|"
                        r"how so|same for|tell me more|more on|compared to|versus|vs\.?)\b", re.I)
# A question with this many terms of its own, and nothing pointing back, stands alone.
OWN_TERMS = 3
# Most terms carried from the earlier questions.
CARRIED_TERMS = 8


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def content_terms(text: str) -> list[str]:
    """The words that carry the topic, in order, once each (case kept, compared case-blind)."""
    seen: set[str] = set()
    out: list[str] = []
    for w in _words(text):
        low = w.lower()
        if low in _STOP or low in _ANAPHORA or low in seen or (len(w) < 2 and not w.isdigit()):
            continue
        seen.add(low)
        out.append(w)
    return out


def refers_back(question: str) -> bool:
    """Whether a question leans on what was said before: a pronoun, a follow-up opening, or too
    few terms of its own to retrieve with."""
    words = {w.lower() for w in _words(question)}
    return bool(words & _ANAPHORA) or bool(_FOLLOW_UP.match(question)) or len(content_terms(question)) < OWN_TERMS


def first_sentence(text: str, max_chars: int = 240) -> str:
    text = _CITE.sub("", " ".join(text.split()))
    s = _SENT.split(text, maxsplit=1)[0] if text else ""
    return s if len(s) <= max_chars else s[:max_chars].rsplit(" ", 1)[0] + " …"


# ------------------------------------------------------------------ rewriting

def rewrite_heuristic(question: str, history: list[HistoryMessage]) -> str:
    """`question`, or when it refers back, with the key terms of the earlier user questions it
    leans on: walking back from the newest, until one that stood alone (or enough terms)."""
    question = " ".join(question.split())
    if not refers_back(question):
        return question
    own = {w.lower() for w in content_terms(question)}
    carried: list[str] = []
    for m in reversed(history):
        if m.role != "user":
            continue
        for t in content_terms(m.content):
            if t.lower() not in own and t.lower() not in {c.lower() for c in carried}:
                carried.append(t)
        if not refers_back(m.content) or len(carried) >= CARRIED_TERMS:
            break  # the question this conversation's thread of reference starts from
    if not carried:
        return question
    return f"{question} ({' '.join(carried[:CARRIED_TERMS])})"


REWRITE_PROMPT = (
    "Rewrite the user's last question so that it can be understood without the conversation: replace "
    "pronouns and references with what they refer to and keep its meaning. Do not answer it. Reply with "
    "the rewritten question only, on one line.")
_LEAD = re.compile(r"^\s*(rewritten question|standalone question|question)\s*:\s*", re.I)


def check_rewrite(text: str, question: str) -> str:
    """A model's rewrite, cleaned, or ValueError saying why it is not one: empty, an answer
    rather than a question (much longer), or nothing to retrieve with."""
    line = next((ln.strip() for ln in (text or "").splitlines() if ln.strip()), "")
    line = _LEAD.sub("", line).strip().strip('"\'“”').strip()
    if not line:
        raise ValueError("the rewrite was empty")
    if len(line) > max(300, 4 * len(question)):
        raise ValueError(f"the rewrite ran to {len(line)} characters: an answer, not a question")
    if not content_terms(line):
        raise ValueError("the rewrite has no terms to retrieve with")
    return line


def _transcript(turns: list[HistoryMessage], summary: str) -> str:
    lines = [f"(Earlier: {summary})"] if summary else []
    lines += [f"{'User' if t.role == 'user' else 'Assistant'}: {t.content}" for t in turns]
    return "\n".join(lines)


def _call(generate: Generate, messages: list[dict], max_tokens: int) -> str:
    """The chat path with a token bound, where it takes one (the RAG app's does)."""
    try:
        bounded = "max_tokens" in inspect.signature(generate).parameters
    except (TypeError, ValueError):
        bounded = False
    return generate(messages, max_tokens=max_tokens) if bounded else generate(messages)


def rewrite_with_model(question: str, transcript: str, generate: Generate, max_tokens: int) -> str:
    messages = [{"role": "system", "content": REWRITE_PROMPT},
                {"role": "user", "content": f"Conversation:\n{transcript}\n\nLast question: {question}\n\n"
                                            "Rewritten question:"}]
    return check_rewrite(_call(generate, messages, max_tokens), question)


# ------------------------------------------------------------------ packing

@dataclass
class PackedHistory:
    """The history as the chat model gets it: a summary of the older turns and the recent ones."""

    summary: str = ""
    turns: list[HistoryMessage] = field(default_factory=list)  # verbatim, oldest first
    summarised: int = 0
    dropped: int = 0
    tokens: int = 0
    summary_by: Literal["model", "extractive", "none"] = "none"


def _cut(text: str, count_tokens: CountTokens, budget: int) -> str:
    """The head of `text` that fits `budget` tokens (whole sentences when any fit)."""
    kept, used = [], 0
    for s in _SENT.split(text):
        n = count_tokens(s) + 1
        if used + n > budget:
            break
        kept.append(s)
        used += n
    if kept:
        return " ".join(kept) + " …"
    words = text.split()
    while words and count_tokens(" ".join(words)) > max(1, budget - 1):
        words = words[: max(1, len(words) * 3 // 4)] if len(words) > 1 else []
    return " ".join(words) + " …" if words else ""


def extractive_summary(older: list[HistoryMessage], count_tokens: CountTokens, budget: int) -> tuple[str, int]:
    """(summary, turns it covers): each turn's leading sentence, newest first until the budget is
    spent, then written oldest first. The turns before those are left out."""
    lines: list[str] = []
    used, earliest = 0, len(older)
    for i in range(len(older) - 1, -1, -1):
        m = older[i]
        s = first_sentence(m.content)
        if s:
            line = f"{'The user asked' if m.role == 'user' else 'The answer said'}: {s}"
            n = count_tokens(line) + 1
            if used + n > budget:
                break
            lines.append(line)
            used += n
        earliest = i
    return "\n".join(reversed(lines)), len(older) - earliest


SUMMARY_PROMPT = ("Summarise this conversation between a user and an assistant in a few short sentences: the "
                  "topics, the questions asked and what the answers said. Reply with the summary only.")


def pack_history(history: list[HistoryMessage], count_tokens: CountTokens, budget: int, recent_turns: int,
                 generate: Generate | None = None, summary_max_tokens: int = 128) -> PackedHistory:
    """Recent turns verbatim (at most `recent_turns`, newest first while they fit), the older
    ones summarised into the rest of `budget`: by `generate` when given (falls back to the
    extractive summary on failure), else extractively."""
    turns = [m for m in history if m.content.strip()]
    out = PackedHistory()
    if budget <= 0 or not turns:
        out.dropped = len(turns)
        return out
    verbatim: list[HistoryMessage] = []
    for m in reversed(turns):
        if len(verbatim) >= recent_turns:
            break
        n = count_tokens(m.content)
        if out.tokens + n > budget:
            if not verbatim:  # the newest alone is over the budget: its head
                cut = _cut(m.content, count_tokens, budget)
                if cut:
                    verbatim.append(HistoryMessage(role=m.role, content=cut))
                    out.tokens += count_tokens(cut)
            break
        verbatim.append(m)
        out.tokens += n
    out.turns = list(reversed(verbatim))
    older = turns[: len(turns) - len(verbatim)]
    room = budget - out.tokens
    if older and room >= 16:
        summary = ""
        if generate is not None:
            try:
                messages = [{"role": "system", "content": SUMMARY_PROMPT},
                            {"role": "user", "content": _transcript(older, "")}]
                summary = " ".join(_call(generate, messages, min(summary_max_tokens, room)).split())
                if summary:
                    summary = summary if count_tokens(summary) <= room else _cut(summary, count_tokens, room)
                    out.summarised, out.summary_by = len(older), "model"
            except Exception as e:  # noqa: BLE001 - the chat path failed: summarise extractively
                log.warning("history summary by the chat model failed, summarising extractively: %s", e)
                summary = ""
        if not summary:
            summary, out.summarised = extractive_summary(older, count_tokens, room)
            out.summary_by = "extractive" if summary else "none"
        out.summary = summary
        out.tokens += count_tokens(summary) if summary else 0
    out.dropped = len(older) - out.summarised
    return out


# ------------------------------------------------------------------ the conversation of one query

@dataclass
class Conversation:
    question: str
    standalone: str
    packed: PackedHistory
    diagnostics: ConversationDiagnostics

    def messages(self, system_prompt: str, context: str) -> list[dict]:
        """The chat model's messages: the system prompt (with the summary of the older turns),
        the recent turns as they were, then the context and the standalone question."""
        system = system_prompt + (f"\n\nEarlier in this conversation: {self.packed.summary}"
                                  if self.packed.summary else "")
        return [{"role": "system", "content": system},
                *({"role": t.role, "content": t.content} for t in self.packed.turns),
                {"role": "user", "content": f"Context:\n{context}\n\nQuestion: {self.standalone}"}]


def prepare(question: str, history: list[HistoryMessage], settings, count_tokens: CountTokens,
            generate: Generate | None = None, thread: str | None = None) -> Conversation:
    """Rewrite `question` to stand alone from `history` and pack the history (`settings`: a
    RagConversationSettings). `generate` is the chat path of the answer's model, if any."""
    question = " ".join(question.split())
    summarise = generate if settings.summary == "auto" else None
    packed = pack_history(history, count_tokens, settings.history_tokens, settings.recent_turns, summarise,
                          settings.summary_max_tokens)
    standalone, method, reason = question, "none", None
    if history and settings.rewrite != "off":
        if generate is not None and settings.rewrite == "auto":
            try:
                # The rewrite sees the recent turns and the summary, bounded like the answer's history.
                transcript = _transcript(packed.turns or history[-2:], packed.summary)
                standalone, method = rewrite_with_model(question, transcript, generate,
                                                        settings.rewrite_max_tokens), "model"
            except Exception as e:  # noqa: BLE001 - any failure of the chat path or the check
                reason = f"{type(e).__name__}: {e}"[:300]
                log.info("model rewrite not used (%s): the heuristic rewrites", reason)
        if method == "none":
            standalone = rewrite_heuristic(question, history)
            method = "heuristic" if standalone != question else "none"
    diag = ConversationDiagnostics(
        question=question, standalone_question=standalone, rewrite=method, rewrite_fallback_reason=reason,
        history_messages=len(history), verbatim_messages=len(packed.turns), summarised_messages=packed.summarised,
        dropped_messages=packed.dropped, summary=packed.summary_by, history_tokens=packed.tokens, thread=thread)
    return Conversation(question, standalone, packed, diag)
