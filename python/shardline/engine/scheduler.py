"""Continuous batching: which sequences compute how many tokens in the next step.

Each step has a token budget (`max_num_batched_tokens`) and a cap on running sequences
(`max_num_seqs`). Running sequences that are decoding go first, in arrival order, then
running sequences still prefilling, then waiting sequences in arrival order (FCFS: when
the head of the queue cannot start, for want of blocks or budget, nothing behind it
does). Two kinds wait at the front while the requests behind them go ahead: a sibling
of an n > 1 request whose leader is still prefilling the shared prompt, until it can
reuse the leader's prompt blocks; and a sequence whose id is still held by a step in
flight of a finished sequence of that id, until that step is back (see below). A prompt
longer than the remaining budget is computed in chunks over several steps (chunked
prefill); one whose request asks for prompt logprobs computes its whole prompt, taking
no cached prefix, until they have all come back. When the KV cache has no free block for
a running sequence, the latest-arrived running sequence not yet scheduled in this step is
preempted: its blocks are freed, it goes back to the front of the queue, and on resume
its prompt and outputs so far are recomputed. A sequence is never preempted for one that
arrived later: when a sequence in this step arrived after that latest one (a decoder ahead
of an earlier prompt still in chunks), the one short of blocks keeps what it has and waits
for a later step.

Under pipeline parallelism the engine keeps up to `pipeline_depth` steps in flight. A
sequence is in at most one of them (its next step needs the token this one samples), so
a step skips the sequences still in flight, and takes at most 1/depth of the unfinished
sequences so that the next step has work for the stages this one has left. A sequence in
flight is never preempted: when the latest-arrived running sequence not in this step is in
flight, a sequence short of blocks waits for that step rather than preempting an earlier one
(or itself), and no waiting sequence starts in this step; otherwise two that together
outgrow the cache would preempt each other forever, each losing its progress while the
other is in flight. One that finishes or is aborted while in flight keeps its KV blocks
until its step returns, and that step's token for it is dropped. A new sequence may
take its id at once (it waits in the queue until that step is back).

With async scheduling (no pipeline, no sequence parallelism) the engine keeps two steps in
flight, and a sequence may be in both, so the engine schedules step N+1 while the device
runs step N. A prompt computed in chunks sends its next chunk while the one before is in
flight: its tokens are known, and the worker computes the chunks in order. A decoding
sequence's second step decodes the token the first one samples, which the worker still
holds and the engine has not seen. Decoding goes one step ahead only when the token it
waits for cannot end it by length, and when its sampling needs no token history
(penalties need every output token on the host); if the token ends it by a stop
condition, the step ahead computes one token that is dropped. Going ahead takes free
blocks only, never preempting, and a preempted sequence comes back only in a step that
takes every running sequence (see schedule).
"""

from __future__ import annotations

import bisect
from collections import Counter, deque
from dataclasses import dataclass

from shardline.config import SchedulerConfig
from shardline.step import ModelRunnerOutput, NewRequestData, SchedulerOutput
from shardline.engine.kv_blocks import KVBlockManager
from shardline.engine.sequence import Sequence, SequenceStatus


@dataclass
class SchedulerStats:
    """Running totals, for tests, benchmarks and metrics. `num_lookup_tokens` counts the
    tokens of sequences looked up in the prefix cache as they start (or resume), of which
    `num_cached_tokens` were found there."""

    num_steps: int = 0
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    num_lookup_tokens: int = 0
    num_preemptions: int = 0


class Scheduler:
    """Owns the waiting queue, the running set and the KV block manager's allocations."""

    def __init__(self, config: SchedulerConfig, kv: KVBlockManager,
                 pipeline_depth: int = 1, schedule_ahead: bool = False) -> None:
        if schedule_ahead and pipeline_depth > 1:
            raise ValueError(f"schedule_ahead needs pipeline_depth=1, got {pipeline_depth}: "
                             "pipelined steps already keep the device busy")
        self.config = config
        self.kv = kv
        self.pipeline_depth = pipeline_depth
        self.schedule_ahead = schedule_ahead
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.seqs: dict[str, Sequence] = {}
        self.stats = SchedulerStats()
        self._finished_ids: list[str] = []
        self._in_flight: Counter[str] = Counter()   # steps sent that have not returned
        self._retired: set[str] = set()   # ids finished while steps in flight hold them

    @property
    def max_steps_in_flight(self) -> int:
        """Steps the engine keeps in flight: one per pipeline stage, or two when scheduling
        ahead (the device runs one while the engine prepares the next)."""
        return 2 if self.schedule_ahead else self.pipeline_depth

    def add(self, seq: Sequence) -> None:
        """Queue a sequence. Its id may be that of a finished one whose steps are still in
        flight: it starts once they are back."""
        if seq.seq_id in self.seqs:
            raise ValueError(f"sequence id {seq.seq_id!r} is already scheduled")
        self.seqs[seq.seq_id] = seq
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.seqs)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Retire a sequence (stopped, length or aborted) and release its blocks."""
        if not status.finished:
            raise ValueError(f"status={status} is not a finished status")
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = status
        del self.seqs[seq.seq_id]
        if seq.seq_id in self._in_flight:  # its step still uses the blocks
            self._retired.add(seq.seq_id)
        else:
            self._release(seq.seq_id, seq.num_tokens_sent > 0)

    def _release(self, seq_id: str, workers_know_it: bool) -> None:
        self.kv.free(seq_id)
        if workers_know_it:
            self._finished_ids.append(seq_id)

    def schedule(self) -> SchedulerOutput:
        """Pick this step's work: running sequences (decodes first), then waiting ones."""
        out = SchedulerOutput()
        budget, short, held_back = self._schedule_running(out)
        # Blocks freed by a preemption go to the preempted sequences first, and blocks that a
        # running sequence waits for go to it, not to newcomers.
        if not short:
            # Scheduling ahead, a preempted sequence comes back only in a step that takes
            # every running sequence: admitted while one that outgrows the cache is in
            # flight, it would take the blocks that one needs, be preempted by it again
            # and again, and neither would finish.
            self._schedule_waiting(out, budget, readmit=not (self.schedule_ahead and held_back))
        # An empty step is never run, so its retired ids wait for the next real one.
        if not out.is_empty:
            out.finished_req_ids = self._finished_ids
            self._finished_ids = []
        return out

    def update(self, scheduled: SchedulerOutput, result: ModelRunnerOutput) -> list[Sequence]:
        """Record a finished step; return the sequences that received a token, in order."""
        retired = set()   # finished or aborted while this step ran: their tokens are dropped
        for seq_id, num_tokens in scheduled.num_scheduled_tokens.items():
            self._in_flight[seq_id] -= 1
            if not self._in_flight[seq_id]:
                del self._in_flight[seq_id]
            if seq_id in self._retired:
                retired.add(seq_id)
                if seq_id not in self._in_flight:  # else a step ahead still uses the blocks
                    self._retired.remove(seq_id)
                    self._release(seq_id, True)
                continue
            seq = self.seqs[seq_id]
            seq.num_computed_tokens += num_tokens
            seq.num_tokens_in_flight -= num_tokens
            self.kv.cache_computed_blocks(seq_id, seq.token_ids, seq.num_computed_tokens)
        self.stats.num_steps += 1
        self.stats.num_computed_tokens += scheduled.total_num_scheduled_tokens
        for logprobs in result.prompt_logprobs:
            if logprobs.req_id not in retired:
                self.seqs[logprobs.req_id].add_prompt_logprobs(logprobs)
        sampled = []
        for seq_id, token, logprobs in zip(result.req_ids, result.sampled_token_ids,
                                           result.logprobs):
            if seq_id in retired:
                continue
            seq = self.seqs[seq_id]
            if seq.num_computed_tokens != seq.num_tokens:
                raise RuntimeError(f"executor sampled for {seq_id!r} before its prefill ended "
                                   f"({seq.num_computed_tokens} of {seq.num_tokens} computed)")
            seq.append_output(token, logprobs)
            sampled.append(seq)
        return sampled

    def _schedule_running(self, out: SchedulerOutput) -> tuple[int, bool, bool]:
        """Schedule running sequences; return the budget left, whether any lacked blocks
        (and preempted one, or waits for one in flight), and whether any was held back
        because it is in flight."""
        budget = self.config.max_num_batched_tokens
        short = held_back = False
        for seq in sorted(self.running, key=lambda s: (s.is_prefilling, s.arrival)):
            if budget == 0 or len(out.num_scheduled_tokens) >= self._step_seq_cap:
                break
            if seq.status is not SequenceStatus.RUNNING:
                continue  # preempted earlier in this loop
            in_flight = seq.seq_id in self._in_flight
            if in_flight and not self._can_go_ahead(seq):
                held_back = True
                continue
            start = seq.num_computed_tokens + seq.num_tokens_in_flight
            # Tokens known to the engine, plus the one a step in flight samples if this step
            # decodes ahead of it (a prompt's next chunk needs no sampled token).
            num_tokens = seq.num_tokens + (in_flight and start == seq.num_tokens)
            num_new = min(num_tokens - start, budget)
            allocated = self.kv.allocate(seq.seq_id, start + num_new)
            # Going ahead is optional: it takes free blocks only, never another's.
            while allocated is None and not in_flight:
                short = True
                victim = self._preemption_victim(out)
                if victim is None:
                    break  # the latest-arrived is in flight: wait for its step
                self._preempt(victim)
                if victim is seq:
                    break
                allocated = self.kv.allocate(seq.seq_id, start + num_new)
            if allocated is None:
                held_back |= in_flight
                continue
            table = self.kv.block_table(seq.seq_id)
            out.cached_requests.append(seq.seq_id, seq.token_ids[seq.num_tokens_sent:],
                                       table[seq.num_blocks_sent:], start)
            self._mark_sent(seq, num_new, out)
            budget -= num_new
        return budget, short, held_back

    def _schedule_waiting(self, out: SchedulerOutput, budget: int, readmit: bool) -> None:
        """Start waiting sequences in FCFS order; preempted ones only if `readmit`."""
        # Siblings waiting for their leader's prompt blocks, and sequences whose id a
        # finished one's step in flight still holds.
        held: list[Sequence] = []
        while (self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs
               and len(out.num_scheduled_tokens) < self._step_seq_cap):
            seq = self.waiting[0]
            if seq.num_preemptions and not readmit:
                break
            leader = seq.prefix_leader
            if seq.seq_id in self._in_flight or (
                    leader is not None and leader.status is SequenceStatus.RUNNING
                    and leader.is_prefilling):
                held.append(self.waiting.popleft())
                continue
            prefix = ([] if seq.needs_prompt_logprobs
                      else self.kv.find_cached_prefix(seq.token_ids))
            num_cached = len(prefix) * self.kv.block_size
            num_new = seq.num_tokens - num_cached
            if (not self.config.enable_chunked_prefill
                    and budget < num_new <= self.config.max_num_batched_tokens):
                break
            num_new = min(num_new, budget)
            if self.kv.allocate(seq.seq_id, num_cached + num_new, prefix) is None:
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            seq.num_computed_tokens = num_cached
            if not seq.num_preemptions:
                seq.num_cached_tokens = num_cached
            self.stats.num_cached_tokens += num_cached
            if not seq.needs_prompt_logprobs:
                self.stats.num_lookup_tokens += seq.num_tokens
            bisect.insort(self.running, seq, key=lambda s: s.arrival)
            out.new_requests.append(NewRequestData(
                req_id=seq.seq_id,
                prompt_token_ids=seq.prompt_token_ids,
                output_token_ids=list(seq.output_token_ids),
                sampling_params=seq.worker_params(),
                block_ids=list(self.kv.block_table(seq.seq_id)),
                num_computed_tokens=num_cached,
            ))
            self._mark_sent(seq, num_new, out)
            budget -= num_new
        self.waiting.extendleft(reversed(held))

    @property
    def _step_seq_cap(self) -> int:
        """Sequences one step may take: all, or 1/depth of them when steps are pipelined."""
        if self.pipeline_depth == 1:
            return self.config.max_num_seqs
        return max(1, -(-len(self.seqs) // self.pipeline_depth))

    def _can_go_ahead(self, seq: Sequence) -> bool:
        """Whether a sequence in flight may join the next step too: scheduling ahead is on,
        it is in one step only, and either that step computes a chunk of its prompt short
        of the end (the next chunk's tokens are known), or it samples the next token, that
        token cannot end it by length, and its sampling needs no token history."""
        if not self.schedule_ahead or self._in_flight[seq.seq_id] != 1:
            return False
        unsent = seq.num_tokens - seq.num_computed_tokens - seq.num_tokens_in_flight
        if unsent > 0:
            return True
        params = seq.params
        return (seq.num_tokens + 1 < seq.max_len
                and (params.max_tokens is None or seq.num_output_tokens + 1 < params.max_tokens)
                and not params.needs_token_history)

    def _preemption_victim(self, out: SchedulerOutput) -> Sequence | None:
        """The latest-arrived running sequence not in this step, or None (the one short of
        blocks waits for a later step) if that one is in flight or arrived before one in this
        step. Preempting an earlier one instead of one in flight would let two sequences that
        together outgrow the cache preempt each other forever, each losing its progress while
        the other is in flight. And decodes go first, so a prompt in chunks comes after the
        later-arrived decoders in the step: preempting it (often itself) for them would make
        a long prompt start over again and again under a stream of short requests."""
        latest = max((s for s in self.running if s.seq_id not in out.num_scheduled_tokens),
                     key=lambda s: s.arrival)
        if latest.seq_id in self._in_flight or any(
                self.seqs[seq_id].arrival > latest.arrival
                for seq_id in out.num_scheduled_tokens):
            return None
        return latest

    def _mark_sent(self, seq: Sequence, num_new: int, out: SchedulerOutput) -> None:
        self._in_flight[seq.seq_id] += 1
        seq.num_tokens_in_flight += num_new
        out.num_scheduled_tokens[seq.seq_id] = num_new
        seq.num_tokens_sent = seq.num_tokens
        seq.num_blocks_sent = len(self.kv.block_table(seq.seq_id))

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.kv.free(seq.seq_id)
        if seq.num_tokens_sent:
            self._finished_ids.append(seq.seq_id)
        seq.reset_for_recompute()
        self.waiting.appendleft(seq)
        self.stats.num_preemptions += 1
