"""Turns sampled tokens into RequestOutputs: detokenizes, applies stop conditions, and
retires sequences that are done.

A stop string is cut from the final text, so an unfinished sequence's output leaves out
the trailing characters that could still begin one: text once shown is never taken back,
whoever streams it."""

from __future__ import annotations

from shardline.engine.detokenizer import Decoder, IncrementalDetokenizer
from shardline.engine.outputs import CompletionOutput, ListSnapshot, RequestOutput
from shardline.engine.scheduler import Scheduler
from shardline.engine.sequence import Sequence, SequenceStatus


class RequestState:
    """One user request: its prompt and the sequences generated from it."""

    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                 seqs: list[Sequence], tokenizer: Decoder | None) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.seqs = seqs
        # Looked up every step, and they may number a vocabulary: a set, not the list.
        self.stop_token_ids = frozenset(seqs[0].params.stop_token_ids)
        self.detokenizers = [None if tokenizer is None
                             else IncrementalDetokenizer(tokenizer, prompt_token_ids,
                                                         seq.params.skip_special_tokens)
                             for seq in seqs]

    @property
    def finished(self) -> bool:
        return all(seq.finished for seq in self.seqs)

    def text(self, seq: Sequence) -> str:
        """The sequence's text that is final: all of it once finished, else all but the
        end that could still begin a stop string."""
        detokenizer = self.detokenizers[seq.index]
        if detokenizer is None:
            return ""
        text = detokenizer.text
        if seq.finished or not seq.params.stop:
            return text
        return text[:stop_prefix_start(text, seq.params.stop)]

    def make_output(self) -> RequestOutput:
        """A snapshot of the request; every output of it shares one prompt_token_ids list."""
        completions = [_completion(seq, self.text(seq)) for seq in self.seqs]
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_token_ids,
            outputs=completions,
            finished=all(c.finish_reason is not None for c in completions),
            num_cached_tokens=sum(seq.num_cached_tokens for seq in self.seqs),
            prompt_logprobs=(None if self.seqs[0].prompt_logprobs is None
                             else ListSnapshot(self.seqs[0].prompt_logprobs)),
        )


class OutputProcessor:
    """Keeps every unfinished request's state and builds its outputs after each step."""

    def __init__(self, scheduler: Scheduler, eos_token_ids: list[int]) -> None:
        self.scheduler = scheduler
        self.eos_token_ids = set(eos_token_ids)
        self.requests: dict[str, RequestState] = {}

    def add(self, state: RequestState) -> None:
        self.requests[state.request_id] = state

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop every sequence of the request; None if it is unknown or already finished."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return None
        for seq in state.seqs:
            if not seq.finished:
                self.scheduler.finish(seq, SequenceStatus.FINISHED_ABORTED)
        return state.make_output()

    def process(self, sampled: list[Sequence]) -> list[RequestOutput]:
        """Apply one step's new tokens; return outputs of the requests that progressed."""
        progressed: dict[str, RequestState] = {}
        for seq in sampled:
            state = self.requests[seq.request_id]
            self._check_stop(seq, state)
            progressed[seq.request_id] = state
        outputs = []
        for request_id, state in progressed.items():
            output = state.make_output()
            outputs.append(output)
            if output.finished:
                del self.requests[request_id]
        return outputs

    def _check_stop(self, seq: Sequence, state: RequestState) -> None:
        token = seq.token_ids[-1]
        params = seq.params
        # Short of min_tokens only the length limits end a sequence (the sampler kept it
        # from drawing a stop token).
        may_stop = seq.num_output_tokens >= params.min_tokens
        is_stop_token = token in state.stop_token_ids
        ended_by_token = may_stop and ((token in self.eos_token_ids and not params.ignore_eos)
                                       or is_stop_token)
        status = None
        if ended_by_token:
            status = SequenceStatus.FINISHED_STOPPED
            seq.stop_reason = token if is_stop_token else None
        elif seq.num_tokens >= seq.max_len or (params.max_tokens is not None
                                               and seq.num_output_tokens >= params.max_tokens):
            status = SequenceStatus.FINISHED_LENGTH
        detokenizer = state.detokenizers[seq.index]
        if detokenizer is not None:
            delta = "" if ended_by_token else detokenizer.append(token)
            if status is not None:
                delta += detokenizer.flush()
            if (delta and params.stop and may_stop
                    and self._truncate_at_stop(detokenizer, len(delta), seq)):
                return
        if status is not None:
            self.scheduler.finish(seq, status)

    def _truncate_at_stop(self, detokenizer: IncrementalDetokenizer, delta_len: int,
                          seq: Sequence) -> bool:
        """Cut the text before the earliest stop string that the new text completed (one
        that ended before it was not honoured: the sequence was short of min_tokens)."""
        text = detokenizer.text
        old_len = len(text) - delta_len
        hits = [(text.find(s, max(old_len - len(s) + 1, 0)), s) for s in seq.params.stop]
        hits = [(pos, s) for pos, s in hits if pos >= 0]
        if not hits:
            return False
        pos, stop = min(hits)
        detokenizer.text = text[:pos]
        seq.stop_reason = stop
        self.scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)
        return True


def stop_prefix_start(text: str, stops: list[str]) -> int:
    """Where the longest end of `text` that begins some stop string starts; len(text) if
    no end does. Only the last len(stop) - 1 characters can, so the cost is independent of
    the text's length."""
    start = len(text)
    for stop in stops:
        pos = text.find(stop[0], max(len(text) - len(stop) + 1, 0), start)
        while pos >= 0 and not stop.startswith(text[pos:]):
            pos = text.find(stop[0], pos + 1, start)
        if pos >= 0:
            start = pos
    return start


def _completion(seq: Sequence, text: str) -> CompletionOutput:
    """The sequence so far, in time independent of its length (snapshots, no copies)."""
    wants_logprobs = seq.params.logprobs is not None
    return CompletionOutput(
        index=seq.index,
        text=text,
        token_ids=ListSnapshot(seq.output_token_ids),
        cumulative_logprob=seq.cumulative_logprob if wants_logprobs else None,
        logprobs=ListSnapshot(seq.output_logprobs) if wants_logprobs else None,
        finish_reason=seq.finish_reason,
        stop_reason=seq.stop_reason,
    )
