"""PII detection and redaction with Microsoft Presidio, fully offline.

Presidio's default analyzer wants a spaCy model (and downloads one when it is missing). Here
the analyzer gets a registry of Presidio's own pattern recognizers, each with its validation
(Luhn for credit cards, the IBAN checksum, SSN and IP validity, phone numbers through
`phonenumbers`), and the no-op NLP engine, so nothing is loaded or downloaded. PERSON names are
detected only when `pii.spacy_model` names a spaCy model that is already installed (a missing
one is a configuration error, never a download).

`redact` replaces each finding by a numbered placeholder (`<EMAIL_ADDRESS_1>`) and returns the
mapping, so an answer that repeats a placeholder can be `restore`d for the caller.
`redact_value` redacts every string inside a JSON-like value (audit details, log fields).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import Any

PATTERN_ENTITIES = ("EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "US_SSN", "IP_ADDRESS")
PLACEHOLDER = re.compile(r"<([A-Z_]+)_(\d+)>")


class PiiConfigError(ValueError):
    """PII settings that cannot work offline (an unknown entity, a spaCy model that is not installed)."""


@dataclass(frozen=True)
class Finding:
    entity: str
    start: int
    end: int
    score: float
    text: str


_TLD = None


def _offline_tld():
    """tldextract with the public suffix list it ships (its default fetches the list from the internet)."""
    global _TLD
    if _TLD is None:
        import tldextract

        _TLD = tldextract.TLDExtract(suffix_list_urls=(), cache_dir=None)
    return _TLD


def _recognizers():
    from presidio_analyzer.predefined_recognizers import (CreditCardRecognizer, EmailRecognizer, IbanRecognizer,
                                                          IpRecognizer, PhoneRecognizer, UsSsnRecognizer)

    class OfflineEmailRecognizer(EmailRecognizer):
        def validate_result(self, pattern_text: str):  # the same check as Presidio's, offline
            return _offline_tld()(pattern_text).fqdn != ""

    return {"EMAIL_ADDRESS": OfflineEmailRecognizer, "PHONE_NUMBER": PhoneRecognizer, "CREDIT_CARD": CreditCardRecognizer,
            "IBAN_CODE": IbanRecognizer, "US_SSN": UsSsnRecognizer, "IP_ADDRESS": IpRecognizer}


class PiiDetector:
    def __init__(self, entities: list[str] | tuple[str, ...] = PATTERN_ENTITIES, spacy_model: str = "",
                 min_score: float = 0.4):
        from presidio_analyzer import AnalyzerEngine, RecognizerRegistry

        known = _recognizers()
        unknown = [e for e in entities if e not in known and e != "PERSON"]
        if unknown:
            raise PiiConfigError(f"pii.entities: unknown entity type(s) {unknown}; known: {sorted(known)} and PERSON")
        registry = RecognizerRegistry(supported_languages=["en"])
        for e in entities:
            if e in known:
                registry.add_recognizer(known[e]())
        if spacy_model:
            nlp = self._spacy_engine(spacy_model)
            if "PERSON" in entities:
                from presidio_analyzer.predefined_recognizers import SpacyRecognizer

                registry.add_recognizer(SpacyRecognizer(supported_entities=["PERSON"]))
        else:
            if "PERSON" in entities:
                raise PiiConfigError("pii.entities names PERSON, which needs pii.spacy_model (an installed spaCy model)")
            from presidio_analyzer.nlp_engine import NoOpNlpEngine

            nlp = NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "no-op"}])
        self.entities = list(entities)
        self.min_score = min_score
        self.analyzer = AnalyzerEngine(registry=registry, nlp_engine=nlp, supported_languages=["en"])
        self._lock = threading.Lock()

    @staticmethod
    def _spacy_engine(model: str):
        from pathlib import Path

        import spacy

        if not (spacy.util.is_package(model) or Path(model).exists()):
            raise PiiConfigError(f"pii.spacy_model {model!r} is not installed (nothing is downloaded at run time)")
        from presidio_analyzer.nlp_engine import SpacyNlpEngine

        return SpacyNlpEngine(models=[{"lang_code": "en", "model_name": model}])

    def analyze(self, text: str) -> list[Finding]:
        if not text:
            return []
        with self._lock:
            results = self.analyzer.analyze(text=text, language="en", entities=self.entities,
                                            score_threshold=self.min_score)
        # Overlaps: keep the higher score, then the longer span.
        results.sort(key=lambda r: (-r.score, -(r.end - r.start), r.start))
        kept: list = []
        for r in results:
            if all(r.end <= k.start or r.start >= k.end for k in kept):
                kept.append(r)
        kept.sort(key=lambda r: r.start)
        return [Finding(r.entity_type, r.start, r.end, round(float(r.score), 3), text[r.start:r.end]) for r in kept]

    def redact(self, text: str, mapping: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
        """The text with each finding replaced by `<TYPE_n>`; the mapping placeholder -> original
        (extended in place when given, so one conversation numbers its values once)."""
        mapping = {} if mapping is None else mapping
        reverse = {v: k for k, v in mapping.items()}
        out, last = [], 0
        for f in self.analyze(text):
            ph = reverse.get(f.text)
            if ph is None:
                n = 1 + sum(1 for k in mapping if k.startswith(f"<{f.entity}_"))
                ph = f"<{f.entity}_{n}>"
                mapping[ph] = f.text
                reverse[f.text] = ph
            out.append(text[last:f.start])
            out.append(ph)
            last = f.end
        out.append(text[last:])
        return "".join(out), mapping

    @staticmethod
    def restore(text: str, mapping: dict[str, str]) -> str:
        return PLACEHOLDER.sub(lambda m: mapping.get(m.group(0), m.group(0)), text)

    def tags(self, text: str) -> list[str]:
        """`pii:<TYPE>` for each entity type found (ingest tagging)."""
        return sorted({f"pii:{f.entity}" for f in self.analyze(text)})

    def redact_value(self, value: Any) -> Any:
        if isinstance(value, str):
            return self.redact(value)[0]
        if isinstance(value, dict):
            return {k: self.redact_value(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self.redact_value(v) for v in value]
        return value


_DETECTORS: dict[tuple, PiiDetector] = {}
_LOCK = threading.Lock()


def detector_for(entities: list[str], spacy_model: str = "", min_score: float = 0.4) -> PiiDetector:
    """This process's detector for these options (built once: the analyzer takes a few seconds)."""
    key = (tuple(entities), spacy_model, min_score)
    with _LOCK:
        d = _DETECTORS.get(key)
        if d is None:
            d = _DETECTORS[key] = PiiDetector(list(entities), spacy_model, min_score)
        return d


def detector(settings: Any) -> PiiDetector:
    p = settings.pii
    return detector_for(p.entities, p.spacy_model, p.min_score)


def redact_value(value: Any, settings: Any) -> Any:
    return detector(settings).redact_value(value)
