"""The RAG query service: plain Python, no HTTP. The gateway's `POST /v1/rag/query` (and the
`orfeas ask` command) validate a `RagQueryRequest`, call `RagService.query` and return the
`RagQueryResponse`. Errors are typed (rag.errors, subclasses of models.errors.APIError).

    service = RagService(settings)                      # store from settings (Edge actor / server)
    resp = service.query(RagQueryRequest(query="..."), generate=chat_fn, generator="qwen2.5")

`generate(messages) -> str` is the gateway's chat path (OpenAI-style messages in, text out).
Without one, or when it raises, the extractive answerer quotes the retrieved passages with
citations and `model` says "extractive".
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from config import Settings
from observability import tracing
from rag.answer import Citation, cited_indices, citations_for_generated, extractive_answer
from rag.attribution import attribute_citations
from rag.chunking import load_tokenizer
from rag.conversation import (MAX_HISTORY_MESSAGES, Conversation, ConversationDiagnostics, HistoryMessage,
                              prepare as prepare_conversation)
from rag.embedding import embedder_dir
from rag.errors import PromptInjectionDetected, RagInvalidRequest
from rag.injection import InjectionReport, detect_injection
from rag.packing import Passage, format_context, pack_context
from rag.quality import AnswerQuality, GateDecision, MemoEmbed, gate, score_answer
from rag.retrieval import RetrievalDiagnostics, Retriever
from rag.store import PayloadFilter, VectorStore, open_store

log = logging.getLogger(__name__)

EXTRACTIVE_MODEL = "extractive"
SYSTEM_PROMPT = (
    "Answer the question using only the numbered context passages. Cite every claim with the "
    "passage number in square brackets, like [1] or [2][3]. If the passages do not contain the "
    "answer, say that you do not know."
)

Generate = Callable[[list[dict]], str]


class RagQueryRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    query: str
    collection: str | None = None
    top_k: int | None = None
    mode: Literal["dense", "sparse", "hybrid"] | None = None
    fusion: Literal["rrf", "dbsf", "dbsf-doc"] | None = None
    filters: PayloadFilter | None = None
    mmr: bool = False
    rerank: bool | None = None
    graph: bool | None = Field(None, description="Graph-augmented retrieval: the knowledge graph's chunks for the "
                               "question's entities, fused with the search's (default rag.graph.retrieval).")
    max_context_tokens: int | None = Field(None, ge=64, le=1_000_000)
    model: str | None = Field(None, description="Chat model to generate with; the gateway resolves it.")
    include_passages: bool = True
    answer: bool = Field(True, description="False: retrieve and pack only; no answer, no citations.")
    history: list[HistoryMessage] | None = Field(
        None, max_length=MAX_HISTORY_MESSAGES, description="The conversation before this question, oldest first: "
        "the question is rewritten to stand alone from it, and it is packed to rag.conversation.history_tokens "
        "for the chat model (docs/rag.md#conversations).")
    thread: str | None = Field(None, pattern=r"^thr_[0-9a-f]{24}$", description="A thread of this key's "
                               "(`/v1/threads`): its messages are the history, and the question and answer are "
                               "added to it. Not with `history`.")


class RagDiagnostics(BaseModel):
    retrieval: RetrievalDiagnostics
    context_tokens: int
    passages: int
    generation: Literal["chat", "extractive", "none"]
    fallback_reason: str | None = None
    gate: GateDecision | None = Field(None, description="The quality gate's verdict on a generated answer.")
    injections: list[InjectionReport] = Field(default_factory=list, description="Prompt injections found in the "
                                              "question or the retrieved passages, and what was done.")
    conversation: ConversationDiagnostics | None = Field(None, description="With history: the standalone "
                                                         "question retrieval used and how the history was packed.")
    retrieve_ms: float
    generate_ms: float
    total_ms: float


class RagQueryResponse(BaseModel):
    id: str
    object: Literal["rag.answer"] = "rag.answer"
    created: int
    answer: str
    model: str
    citations: list[Citation]
    passages: list[Passage] = []
    quality: AnswerQuality | None = Field(None, description="Scores of the answer (none without an answer).")
    diagnostics: RagDiagnostics


def parse_request(data: dict | RagQueryRequest) -> RagQueryRequest:
    """A request from JSON, with the first problem reported as a RagInvalidRequest (400)."""
    if isinstance(data, RagQueryRequest):
        return data
    try:
        return RagQueryRequest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        raise RagInvalidRequest(f"invalid value for '{param}': {first.get('msg')}", param) from None


class RagService:
    def __init__(self, settings: Settings, store: VectorStore | None = None, retriever: Retriever | None = None):
        self.settings = settings
        self.store = store or (retriever.store if retriever else open_store(settings))
        self.retriever = retriever or Retriever(settings, self.store)
        self._tok = load_tokenizer(embedder_dir(settings))

    def count_tokens(self, text: str) -> int:
        return len(self._tok.encode(text, add_special_tokens=False).ids)

    def messages(self, query: str, passages: list[Passage]) -> list[dict]:
        return [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": f"Context:\n{format_context(passages)}\n\nQuestion: {query}"}]

    def query(self, request: RagQueryRequest | dict, generate: Generate | None = None,
              generator: str | None = None) -> RagQueryResponse:
        """One query, traced as `rag.query` with embed, search, re-rank, pack and generate spans."""
        with tracing.span("rag.query") as s:
            out = self._query(request, generate, generator)
            if s.is_recording():
                d = out.diagnostics
                s.set_attributes({"orfeas.rag.collection": d.retrieval.collection, "orfeas.rag.passages": d.passages,
                                  "orfeas.rag.generation": d.generation, "gen_ai.response.model": out.model,
                                  "orfeas.rag.citations": len(out.citations)})
            return out

    def _query(self, request: RagQueryRequest | dict, generate: Generate | None,
               generator: str | None) -> RagQueryResponse:
        t0 = time.perf_counter()
        req = parse_request(request)
        qs = self.settings.rag.quality
        injections = self._check_input(req.query)
        conv = self._conversation(req, generate, injections)
        question = conv.standalone if conv else req.query  # retrieval, quotes and scores read the standalone one
        with tracing.span("rag.retrieve"):
            chunks, rdiag = self.retriever.retrieve(
                question, req.collection, top_k=req.top_k, mode=req.mode, fusion=req.fusion, filters=req.filters,
                mmr=req.mmr, rerank=req.rerank, graph=req.graph)
        chunks = self._check_passages(chunks, injections)
        t1 = time.perf_counter()
        budget = req.max_context_tokens or self.settings.rag.context_tokens
        with tracing.span("rag.pack", {"orfeas.rag.budget_tokens": budget, "orfeas.rag.chunks": len(chunks)}):
            passages = pack_context(chunks, self.count_tokens, budget)
        embed = MemoEmbed(self.retriever.dense.embed)  # answer, citations and scores share vectors
        fallback_reason, quality, verdict = None, None, None
        answer, cites, model = "", [], EXTRACTIVE_MODEL
        if not req.answer:
            generate = None
        if passages and generate is not None:
            try:
                with tracing.span("rag.generate", {"gen_ai.request.model": generator or req.model or ""}):
                    answer = generate(conv.messages(SYSTEM_PROMPT, format_context(passages)) if conv
                                      else self.messages(req.query.strip(), passages))
                cites = citations_for_generated(answer, question, passages, embed)
                model = generator or req.model or "chat"
            except Exception as e:  # the chat path failed: fall back, and say why
                log.warning("RAG generation failed, answering extractively: %s", e)
                fallback_reason = f"generation failed: {type(e).__name__}: {e}"[:300]
                answer = ""
            if model != EXTRACTIVE_MODEL:
                with tracing.span("rag.score"):
                    quality = self._score(answer, question, passages, embed)
                if qs.min_groundedness > 0:  # the quality gate
                    verdict = gate(quality, qs.min_groundedness, qs.gate_action)
                    if verdict.action == "refuse":
                        answer, cites = qs.refusal, []
                    elif verdict.action == "extractive":
                        model, fallback_reason, answer = EXTRACTIVE_MODEL, f"quality gate: {verdict.reason}", ""
                if qs.attribute_citations and answer and (verdict is None or verdict.action == "pass"):
                    # (scored before: citation_coverage is the model's own citing)
                    answer, cites = self._attribute(answer, question, passages, embed)
        elif generate is None and req.answer:
            fallback_reason = "no chat model available"
        if model == EXTRACTIVE_MODEL and req.answer:
            if passages:
                answer, cites = extractive_answer(question, passages, embed, self.settings.rag.answer_sentences)
            if not answer:
                answer = f"No passage in collection {rdiag.collection!r} answers this question."
            elif passages:
                quality = self._score(answer, question, passages, embed)  # quotes: the vectors are reused
        t2 = time.perf_counter()
        diag = RagDiagnostics(
            retrieval=rdiag, context_tokens=sum(p.tokens for p in passages), passages=len(passages),
            generation=("chat" if model != EXTRACTIVE_MODEL else "extractive") if req.answer else "none",
            fallback_reason=fallback_reason, gate=verdict, injections=injections,
            conversation=conv.diagnostics if conv else None,
            retrieve_ms=round((t1 - t0) * 1e3, 2), generate_ms=round((t2 - t1) * 1e3, 2),
            total_ms=round((t2 - t0) * 1e3, 2))
        return RagQueryResponse(id=f"rag-{uuid.uuid4().hex[:24]}", created=int(time.time()), answer=answer,
                                model=model, citations=cites, passages=passages if req.include_passages else [],
                                quality=quality, diagnostics=diag)

    def _conversation(self, req: RagQueryRequest, generate: Generate | None,
                      reports: list[InjectionReport]) -> Conversation | None:
        """With history: the question rewritten to stand alone and the history packed (rag.conversation).
        An earlier user message that reads as a prompt injection is reported (input_injection: flag)
        or left out of the history (block): refusing would refuse every later question of a thread."""
        if not req.history or not req.query.strip():
            return None  # (an empty question is refused by retrieval)
        if req.thread is None:  # a thread's messages were checked when they were added
            most = self.settings.rag.conversation.max_message_chars
            for i, m in enumerate(req.history):
                if len(m.content) > most:
                    raise RagInvalidRequest(f"history message {i} has {len(m.content)} characters, over the limit "
                                            f"of {most} (rag.conversation.max_message_chars)", f"history.{i}.content")
        history, mode = list(req.history), self.settings.rag.quality.input_injection
        if mode != "off":
            history = []
            for i, m in enumerate(req.history):
                found = detect_injection(m.content) if m.role == "user" else []
                if found:
                    reports.append(InjectionReport(where="input", action="flag" if mode == "flag" else "drop",
                                                   rules=[f.rule for f in found], source=f"history.{i}"))
                if not found or mode == "flag":
                    history.append(m)
        with tracing.span("rag.conversation", {"orfeas.rag.history": len(req.history)}):
            return prepare_conversation(req.query, history, self.settings.rag.conversation, self.count_tokens,
                                        generate if req.answer else None, thread=req.thread)

    def _check_input(self, query: str) -> list[InjectionReport]:
        """The question's prompt-injection check: refused (400) or reported per input_injection."""
        mode = self.settings.rag.quality.input_injection
        found = detect_injection(query) if mode != "off" else []
        if not found:
            return []
        rules = [f.rule for f in found]
        if mode == "block":
            raise PromptInjectionDetected(
                f"the question reads as a prompt injection (rules: {', '.join(rules)}; matched "
                f"{found[0].match!r}); rephrase it as a question about the documents", "query")
        return [InjectionReport(where="input", action="flag", rules=rules)]

    def _check_passages(self, chunks: list, reports: list[InjectionReport]) -> list:
        """Indirect injection: retrieved chunks carrying instructions for the model are left out
        of the context or reported, per passage_injection."""
        mode = self.settings.rag.quality.passage_injection
        if mode == "off":
            return chunks
        kept = []
        for c in chunks:
            found = detect_injection(c.text)
            if found:
                reports.append(InjectionReport(where="passage", action="drop" if mode == "drop" else "flag",
                                               rules=[f.rule for f in found], chunk_id=c.id, source=c.source))
            if not found or mode == "flag":
                kept.append(c)
        return kept

    def _attribute(self, answer: str, query: str, passages: list[Passage], embed) -> tuple[str, list[Citation]]:
        """The answer with [n] after each uncited sentence a passage supports, and its citations
        (those the service added marked `attributed`)."""
        qs = self.settings.rag.quality
        own = set(cited_indices(answer))
        answer, added = attribute_citations(answer, passages, embed, support_threshold=qs.support_threshold,
                                            max_context_sentences=qs.max_context_sentences)
        return answer, citations_for_generated(answer, query, passages, embed, attributed=added - own)

    def _score(self, answer: str, query: str, passages: list[Passage], embed) -> AnswerQuality:
        qs = self.settings.rag.quality
        return score_answer(answer, query, passages, embed, support_threshold=qs.support_threshold,
                            max_context_sentences=qs.max_context_sentences)
