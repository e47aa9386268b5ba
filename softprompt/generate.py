"""Generation with a soft prompt: training on target tokens, and batched decoding.

Training: the loss is the causal-LM loss on the target tokens only (plus an end-of-answer token the
model learns to emit); logits are computed only at the positions that carry loss.

Decoding (greedy, beam search, sampling) uses the key/value cache: the shared prefix (soft tokens +
fixed text) runs once per batch, each row's input once, then one position per new token. Rows are
right-padded; every row gets its own position ids and padded slots are masked, so a row's output does
not depend on what else is in its batch. A `Decoding` holds rows that may belong to different tasks,
each with its own decoding settings, and advances them one token per `step()`: batch generation runs
it to the end, a server interleaves its steps with other work and streams each row's tokens.

A decoding that rows keep joining never drains, so it must not grow with its age: every step adds a
key column to every row and a joining row is padded to the batch's width, so unchecked the cache
grows by a column a step for as long as the server stays busy (240 steps of 4 rows that each need at
most 74 keys ended 307 keys wide). When most of the cache is padding, the live rows' keys are packed
to the front (`pack_keys`): the cache stays within twice what its longest live row needs, at the cost
of one copy each time it doubles. A server also forgets the rows it has answered (`Decoding.compact`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .backbone import Backbone, Context, Layout, join_contexts, pack_keys
from .splice import BatchRow, Prefix, Prompt, PromptedLM, run_rows
from .template import RenderedRows, Template


@dataclass
class DecodeConfig:
    max_new_tokens: int = 128
    num_beams: int = 1
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)  # cut the answer at the first of these
    length_penalty: float = 1.0  # beam search: score / length ** penalty
    seed: int = 0


@dataclass
class GenerationRows:
    encoded: RenderedRows
    targets: list[list[int]] | None  # target ids incl. the end marker, when known
    target_cut: list[int] = field(default_factory=list)  # per row: target tokens cut to fit

    def __len__(self) -> int:
        return len(self.encoded.bodies)


class Generator:
    def __init__(
        self,
        backbone: Backbone,
        template: Template,
        prompt: Prompt | None,
        max_length: int = 512,
        max_target_length: int = 256,
    ) -> None:
        """`max_length` bounds the prompt (soft tokens, fixed text, input fields: the fields are cut
        to fit), in training and in use alike; `max_target_length` bounds the answer in training,
        end marker included. The two budgets are separate, so the answer never eats the input."""
        self.backbone = backbone
        self.template = template
        self.lm = PromptedLM(backbone, prompt, template.soft_tokens)
        self.max_length = max_length
        self.max_target_length = max_target_length
        self.eos_id = backbone.tokenizer.eos_token_id

    def with_prompt(self, prompt: Prompt | None) -> Generator:
        """The same template, model and lengths with another prompt; None drops the soft tokens
        (plain prompting, the zero-shot baseline)."""
        template = self.template if prompt is not None or not self.template.soft_tokens else self.template.without_soft()
        return Generator(self.backbone, template, prompt, self.max_length, self.max_target_length)

    def encode(self, rows: list[dict[str, str]], targets: list[str] | None = None) -> GenerationRows:
        tokenize = self.backbone.tokenize_many
        encoded = self.template.encode(rows, tokenize, self.max_length, self.backbone.bos_ids)
        if targets is None:
            return GenerationRows(encoded, None)
        keep = self.max_target_length - 1  # room for the end marker
        full = tokenize([self.template.slot_lead + t for t in targets])
        return GenerationRows(encoded, [ids[:keep] + [self.eos_id] for ids in full], [max(0, len(ids) - keep) for ids in full])

    # -- training -----------------------------------------------------------------------------
    def loss(self, rows: GenerationRows, index: list[int]) -> torch.Tensor:
        """Mean cross-entropy over the target tokens of a batch."""
        assert rows.targets is not None
        prefix = self.lm.run_prefix(rows.encoded.prefix)
        bodies = [rows.encoded.bodies[i] for i in index]
        targets = [rows.targets[i] for i in index]
        out = self.lm.run_rows(prefix, [b + t for b, t in zip(bodies, targets)])
        row_idx = torch.tensor([r for r, t in enumerate(targets) for _ in t])
        pos_idx = torch.tensor([len(bodies[r]) - 1 + k for r, t in enumerate(targets) for k in range(len(t))])
        labels = torch.tensor([tok for t in targets for tok in t])
        hidden = out.hidden[row_idx.to(out.hidden.device), pos_idx.to(out.hidden.device)]
        return -self.backbone.token_log_probs(hidden, labels).mean()

    # -- decoding -----------------------------------------------------------------------------
    def generate(
        self, rows: GenerationRows, config: DecodeConfig | None = None, batch_size: int = 8, progress=None
    ) -> list[str]:
        """Decoded answers, in row order."""
        config = config or DecodeConfig()
        return [answer_text(self.backbone, t, config.stop) for t in self.generate_tokens(rows, config, batch_size, progress)]

    @torch.inference_mode()
    def generate_tokens(
        self, rows: GenerationRows, config: DecodeConfig, batch_size: int = 8, progress=None
    ) -> list[list[int]]:
        """Generated token ids (end marker included when emitted), in row order."""
        prefix = self.lm.run_prefix(rows.encoded.prefix)
        generator = torch.Generator().manual_seed(config.seed)
        order = sorted(range(len(rows)), key=lambda i: len(rows.encoded.bodies[i]))
        answers: list[list[int]] = [[] for _ in range(len(rows))]
        for start in range(0, len(order), batch_size):
            index = order[start : start + batch_size]
            bodies = [rows.encoded.bodies[i] for i in index]
            if config.num_beams > 1:
                outputs = self.beam_search(prefix, bodies, config)
            else:
                outputs = self._sample(prefix, bodies, config, generator)
            for i, tokens in zip(index, outputs):
                answers[i] = tokens
            if progress is not None:
                progress(len(index))
        return answers

    def _sample(
        self, prefix: Prefix, bodies: list[list[int]], config: DecodeConfig, generator
    ) -> list[list[int]]:
        """Greedy or sampled decoding: the one-task case of `Decoding`."""
        decoding = Decoding([RowToDecode(self, prefix, body, config) for body in bodies], generator)
        while not decoding.done:
            decoding.step()
        return decoding.generated

    def beam_search(self, prefix: Prefix, bodies: list[list[int]], config: DecodeConfig) -> list[list[int]]:
        beams = config.num_beams
        context, hidden, positions = start_rows([BatchRow(self.lm, prefix, body) for body in bodies])
        rows = len(bodies)
        context.repeat_interleave(beams)
        hidden = hidden.repeat_interleave(beams, 0)
        positions = positions.repeat_interleave(beams, 0)
        scores = torch.full((rows, beams), -float("inf"))
        scores[:, 0] = 0.0
        histories: list[list[int]] = [[] for _ in range(rows * beams)]
        done = torch.zeros(rows * beams, dtype=torch.bool)
        for _ in range(config.max_new_tokens):
            logp = torch.log_softmax(self.backbone.logits(hidden).cpu(), -1)
            # A finished beam may only "emit" EOS at no cost, so it keeps its score and place.
            logp[done] = -float("inf")
            logp[done, self.eos_id] = 0.0
            vocab = logp.shape[-1]
            candidates = (scores.view(-1, 1) + logp).view(rows, beams * vocab)
            scores, flat = candidates.topk(beams, dim=-1)
            source = (flat // vocab) + torch.arange(rows).unsqueeze(1) * beams
            tokens = (flat % vocab).view(-1)
            source = source.view(-1)
            histories = [
                histories[s] + ([] if done[s] else [t]) for s, t in zip(source.tolist(), tokens.tolist())
            ]
            done = torch.tensor(
                [bool(done[s]) or stopped(self.backbone, h, config.stop) for s, h in zip(source.tolist(), histories)]
            )
            if bool(done.all()):
                break
            context.select(source.to(self.backbone.device))
            hidden, context = next_hidden(self.backbone, context, tokens, positions)
            positions = positions + 1
        final = scores.view(-1) / torch.tensor([max(1, len(h)) ** config.length_penalty for h in histories])
        best = final.view(rows, beams).argmax(-1) + torch.arange(rows) * beams
        return [histories[b] for b in best.tolist()]


def _sample_top_p(
    logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
) -> torch.Tensor:
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p."""
    probs = torch.softmax(logits / max(temperature, 1e-5), dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs > top_p
        sorted_probs[outside] = 0.0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def answer_text(backbone: Backbone, tokens: list[int], stop: list[str]) -> str:
    """The answer: decoded, leading whitespace dropped, cut at the first stop string."""
    text = backbone.tokenizer.decode(tokens, skip_special_tokens=True).lstrip()
    for marker in stop:
        if marker in text:
            text = text[: text.index(marker)]
    return text.strip()


def stopped(backbone: Backbone, tokens: list[int], stop: list[str]) -> bool:
    """End marker emitted, or a stop string after the answer has begun (a model that opens
    with a newline is not stopped by a newline stop string)."""
    if tokens and tokens[-1] == backbone.tokenizer.eos_token_id:
        return True
    if stop:
        text = backbone.tokenizer.decode(tokens, skip_special_tokens=True).lstrip()
        return any(marker in text for marker in stop)
    return False


def start_rows(rows: list[BatchRow]) -> tuple[Context, torch.Tensor, torch.Tensor]:
    """Run the rows' prompts; their context, the hidden states that predict each row's first new
    token, and the position that token will take."""
    out = run_rows(rows)
    hidden = out.hidden[torch.arange(len(rows)), (out.lengths - 1).to(out.hidden.device)]
    return out.context, hidden, out.starts + out.lengths


def next_hidden(
    backbone: Backbone, context: Context, tokens: torch.Tensor, positions: torch.Tensor
) -> tuple[torch.Tensor, Context]:
    """Feed one new token per row at its own position; the new hidden states and the grown context."""
    hidden, context = backbone.run(backbone.embed(tokens.view(-1, 1)), Layout.of(positions.view(-1, 1)), context)
    return hidden[:, -1], context


@dataclass
class RowToDecode:
    """A row to decode: its task's generator, the prefix it follows, its ids, its decoding settings."""

    generator: Generator
    prefix: Prefix
    body: list[int]
    config: DecodeConfig


class Decoding:
    """Greedy or sampled decoding of rows that may belong to different tasks, one token per step.

    Each row stops on its own (end marker, its stop strings, its max_new_tokens) and then leaves the
    batch and its cache, so the remaining rows do not pay for it; new rows may join between steps
    (`add`), so a server keeps its batch full whatever lengths its answers have. A row is known by its
    number (its place in `rows` and `generated`), which only `compact` changes."""

    def __init__(self, rows: list[RowToDecode], generator: torch.Generator | None = None) -> None:
        self.backbone = rows[0].generator.backbone
        self.random = generator if generator is not None else torch.Generator().manual_seed(rows[0].config.seed)
        self.rows: list[RowToDecode | None] = []  # None once released
        self.generated: list[list[int]] = []
        self.active: list[int] = []  # original row of each batch position
        self.cancelled: set[int] = set()
        self.released = 0  # rows released since the last `compact`
        self.add(rows)

    def add(self, rows: list[RowToDecode]) -> None:
        """Run the new rows' prompts; from the next step they decode with the others."""
        context, hidden, positions = start_rows([BatchRow(r.generator.lm, r.prefix, r.body) for r in rows])
        if self.active:
            context = join_contexts([self.context, context])
            hidden, positions = torch.cat([self.hidden, hidden]), torch.cat([self.positions, positions])
        self.context, self.hidden, self.positions = context, hidden, positions
        self.active += range(len(self.rows), len(self.rows) + len(rows))
        self.rows += rows
        self.generated += [[] for _ in rows]

    def cancel(self, row: int) -> None:
        """Finish a row at the next step (its client went away)."""
        self.cancelled.add(row)

    def release(self, row: int) -> None:
        """Forget a finished row's answer and prompt (its prefix states included), once read."""
        assert row not in self.active, "only a finished row can be released"
        if self.rows[row] is not None:
            self.released += 1
        self.rows[row], self.generated[row] = None, []

    def compact(self) -> dict[int, int]:
        """Drop the released rows' places for good and renumber the others 0, 1, ... in order; their
        new numbers by old number. What a server calls now and then, so that a decoding that never
        drains does not keep a place for every row it ever answered."""
        numbers = {old: new for new, old in enumerate(r for r, row in enumerate(self.rows) if row is not None)}
        self.rows = [self.rows[old] for old in numbers]
        self.generated = [self.generated[old] for old in numbers]
        self.active = [numbers[row] for row in self.active]
        self.cancelled = {numbers[row] for row in self.cancelled if row in numbers}
        self.released = 0
        return numbers

    @property
    def done(self) -> bool:
        return not self.active

    def _choose(self, logits: torch.Tensor) -> list[int]:
        tokens = logits.argmax(-1).tolist()
        for position, row in enumerate(self.active):
            config = self.rows[row].config
            if config.do_sample:
                tokens[position] = int(
                    _sample_top_p(logits[position : position + 1], config.temperature, config.top_p, self.random)[0]
                )
        return tokens

    def step(self) -> list[tuple[int, int, bool]]:
        """Emit one token for every active row: (row, token, finished) per row."""
        tokens = self._choose(self.backbone.logits(self.hidden).cpu())
        emitted, keep = [], []
        for position, (row, token) in enumerate(zip(self.active, tokens)):
            self.generated[row].append(token)
            config = self.rows[row].config
            finished = row in self.cancelled or len(self.generated[row]) >= config.max_new_tokens or stopped(
                self.backbone, self.generated[row], config.stop
            )
            emitted.append((row, token, finished))
            if not finished:
                keep.append(position)
        if len(keep) < len(self.active):
            if not keep:
                self.active = []
                return emitted
            index = torch.tensor(keep)
            self.context.select(index.to(self.backbone.device))
            self.positions = self.positions[index]
            self.active = [self.active[i] for i in keep]
            tokens = [tokens[i] for i in keep]
        if self.context.layout.real.shape[1] > 2 * int(self.context.layout.real.sum(1).max()):
            self.context = pack_keys(self.context)  # mostly padding: a copy now saves a column a step for ever
        self.hidden, self.context = next_hidden(self.backbone, self.context, torch.tensor(tokens), self.positions)
        self.positions = self.positions + 1
        return emitted

    def text(self, row: int) -> str:
        return answer_text(self.backbone, self.generated[row], self.rows[row].config.stop)
