"""Classification: template + verbalizer + prompted model -> label scores.

Scores are read at the label slot from the label-word rows of the output projection only. Where a
word has several tokens, or input follows the slot (the seed's Portuguese form), the remaining
tokens are scored teacher-forced in the row's own pass, as a label trie: label names share prefixes
("card arrival", "card linking"), and each distinct prefix is fed once per row (`label_scores`).

Where only the answer is needed (accuracy, a label without probabilities) `label_answers` finds the
best labels exactly without scoring the whole trie: a label never scores above what its prefix has
gathered, so the most promising prefixes are expanded first and the search stops when no open
prefix can beat the best complete label. What a fed prefix gathers is first an upper bound that
costs a few percent of the exact normaliser over the vocabulary (`vocab_bound`); the labels that
decide the answer are then scored exactly.

With one vector per label (`label_vectors: per_label`, `verbalizer.LabelHead`) no label token is
fed at all: a label's score is the slot's hidden state times its own vector, plus its bias, one
projection whatever the names' lengths, so such a row costs what a row of two one-token labels does.

Label before input: we score each label by the likelihood of the whole filled-in sequence (the
label's word followed by the rest of the template with the row's input). A causal model cannot
read the label after input it has not seen yet, so this is the only faithful reading; the input
after the slot is one more branch of the trie below each word.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .backbone import Backbone, Context, Layout, join_contexts
from .logistic import fit_logistic
from .splice import PAD_ID, BatchRow, Prefix, Prompt, PromptedLM, run_rows
from .template import RenderedRows, Template
from .verbalizer import Choices, LabelHead, LabelTrie, Verbalizer

DEFAULT_MAX_LENGTH = 512


@dataclass
class ClassificationRows:
    encoded: RenderedRows
    labels: torch.Tensor | None  # [N] label indices, when known

    def __len__(self) -> int:
        return len(self.encoded.bodies)


class Classifier:
    def __init__(
        self,
        backbone: Backbone,
        template: Template,
        verbalizer: Verbalizer,
        prompt: Prompt | None,
        max_length: int = DEFAULT_MAX_LENGTH,
        prior: torch.Tensor | None = None,
        length_norm: bool = False,
        label_rows: torch.Tensor | None = None,
        label_head: LabelHead | None = None,
    ) -> None:
        """`prior`: [L] label probabilities on content-free inputs, divided out of every prediction
        (contextual calibration, methods/zero_shot.py); None leaves scores as the model gives them.
        `length_norm`: a word's score is its mean log-probability per token, so long label names are
        not penalised (the task's `label_scores: mean`). `label_rows`: [C, H] output vectors that read
        each choice's first token in place of the frozen output rows (learned label vectors, WARP).
        `label_head`: one vector per label read at the slot in place of the label words
        (`label_vectors: per_label`): no label token is scored then."""
        self.backbone = backbone
        self.template = template
        self.verbalizer = verbalizer
        self.lm = PromptedLM(backbone, prompt, template.soft_tokens)
        self.max_length = max_length
        self.choices: Choices = verbalizer.choices(backbone, template.slot_lead)
        self.prior = None if prior is None else torch.as_tensor(prior, dtype=torch.float32)
        self.log_prior = None if prior is None else self.prior.log()
        self.length_norm = length_norm
        self.label_rows = label_rows
        self.label_head = label_head
        self._trie = self.choices.trie([])  # the label trie of every row with nothing after its slot

    def _with(self, **changes) -> Classifier:
        """A copy with some of the constructor's arguments changed."""
        now = dict(
            template=self.template, prompt=self.lm.prompt, max_length=self.max_length, prior=self.prior,
            length_norm=self.length_norm, label_rows=self.label_rows, label_head=self.label_head,
        )
        return Classifier(self.backbone, verbalizer=self.verbalizer, **{**now, **changes})

    def calibrated(self, prior: torch.Tensor | None) -> Classifier:
        """The same classifier with contextual calibration by `prior` (None: uncalibrated)."""
        return self._with(prior=prior)

    def with_label_rows(self, rows: torch.Tensor | None) -> Classifier:
        """The same classifier reading the label slot with learned output rows (None: the model's)."""
        return self._with(label_rows=rows)

    def with_label_head(self, head: LabelHead | None) -> Classifier:
        """The same classifier reading each label by its own vector at the slot (None: by its words)."""
        return self._with(label_head=head)

    def with_prompt(self, prompt: Prompt | None) -> Classifier:
        """The same template, verbalizer, model and length with another prompt (checked against the
        template); None drops the soft tokens, the calibration and learned label rows or vectors
        (plain prompting, the zero-shot baseline)."""
        if prompt is None:
            template = self.template.without_soft() if self.template.soft_tokens else self.template
            return self._with(template=template, prompt=None, prior=None, label_rows=None, label_head=None)
        return self._with(prompt=prompt)

    def zero_shot(self) -> Classifier:
        return self.with_prompt(None)

    @property
    def labels(self) -> list[str]:
        return self.verbalizer.labels

    def encode(self, rows: list[dict[str, str]], labels: list[str] | None = None) -> ClassificationRows:
        encoded = self.template.encode(
            rows, self.backbone.tokenize_many, self.max_length, self.backbone.bos_ids
        )
        index = {label: i for i, label in enumerate(self.labels)}
        targets = torch.tensor([index[y] for y in labels]) if labels is not None else None
        return ClassificationRows(encoded, targets)

    def prefix(self, encoded: RenderedRows) -> Prefix:
        return self.lm.run_prefix(encoded.prefix)

    def trie(self, after: list[int]) -> LabelTrie:
        """The label trie of a row whose slot is followed by `after` (its input, label before input);
        empty when the labels are read by their own vectors (nothing is fed after the row)."""
        if self.label_head is not None:
            return NO_LABEL_TOKENS
        return self.choices.trie(after) if after else self._trie

    def scores(self, prefix: Prefix, bodies: list[list[int]], afters: list[list[int]]) -> torch.Tensor:
        """[B, L] label scores of rows of this task after one prefix (the one-task case of `label_scores`)."""
        return torch.stack(label_scores([RowToScore(self, prefix, b, a) for b, a in zip(bodies, afters)]))

    def _to_score(self, prefix: Prefix, rows: ClassificationRows, index: list[int]) -> list[RowToScore]:
        return [RowToScore(self, prefix, rows.encoded.bodies[i], rows.encoded.afters[i]) for i in index]

    @torch.no_grad()
    def slot_states(self, rows: ClassificationRows, batch_size: int = 16) -> torch.Tensor:
        """[N, H] each row's hidden state at its label slot (fp32, on the CPU), in row order."""
        prefix = self.prefix(rows.encoded)
        states = torch.zeros(len(rows), self.backbone.hidden_size)
        for index in self.batches(rows, batch_size):
            slot, _ = _rows_pass(self._to_score(prefix, rows, index), batch_size)
            states[index] = slot.float().cpu()
        return states

    def batches(self, rows: ClassificationRows, batch_size: int) -> Iterator[list[int]]:
        """Index batches sorted by length, so little compute goes to padding."""
        order = sorted(
            range(len(rows)), key=lambda i: len(rows.encoded.bodies[i]) + len(rows.encoded.afters[i])
        )
        for start in range(0, len(order), batch_size):
            yield order[start : start + batch_size]

    def search_groups(self, rows: ClassificationRows, batch_size: int, prefix_length: int) -> Iterator[list[int]]:
        """Consecutive `batches` joined into the groups that one pruned search runs over (up to
        `SEARCH_ROWS` rows and `SEARCH_KEYS` cached keys): a search step reads every weight of the
        model however few nodes it feeds, so more rows a step make each step cheaper per row."""
        group: list[int] = []
        for index in self.batches(rows, batch_size):
            longest = prefix_length + max(len(rows.encoded.bodies[i]) for i in index)
            if group and (len(group) + len(index) > SEARCH_ROWS or (len(group) + len(index)) * longest > SEARCH_KEYS):
                yield group
                group = []
            group += index
        if group:
            yield group

    @torch.inference_mode()
    def predict_proba(self, rows: ClassificationRows, batch_size: int = 16, progress=None) -> torch.Tensor:
        """[N, L] label probabilities, in row order: every label scored (the whole label trie)."""
        prefix = self.prefix(rows.encoded)
        probs = torch.zeros(len(rows), len(self.labels))
        for index in self.batches(rows, batch_size):
            scores = torch.stack(label_scores(self._to_score(prefix, rows, index)))
            probs[index] = torch.softmax(scores.float(), dim=-1).cpu()
            if progress is not None:
                progress(len(index))
        return probs

    @torch.inference_mode()
    def top_labels(self, rows: ClassificationRows, k: int, batch_size: int = 16, progress=None) -> torch.Tensor:
        """[N, k] each row's k best label indices, best first, in row order: the first k of
        `predict_proba`'s order (ties to the lower index), found by the pruned search
        (`label_answers`), which leaves unscored the labels that cannot win."""
        prefix = self.prefix(rows.encoded)
        top = torch.zeros(len(rows), min(k, len(self.labels)), dtype=torch.long)
        for index in self.search_groups(rows, batch_size, prefix.length):
            top[index] = torch.tensor(label_answers(self._to_score(prefix, rows, index), k, batch_size))
            if progress is not None:
                progress(len(index))
        return top

    def predict(self, rows: ClassificationRows, batch_size: int = 16, progress=None) -> torch.Tensor:
        """[N] each row's label index: `predict_proba(rows).argmax(-1)`, without scoring every label."""
        return self.top_labels(rows, 1, batch_size, progress)[:, 0]

    def loss(self, rows: ClassificationRows, index: list[int]) -> torch.Tensor:
        """Cross-entropy over the labels for one training batch (prefix recomputed: it is trained)."""
        scores = torch.stack(label_scores(self._to_score(self.prefix(rows.encoded), rows, index)))
        assert rows.labels is not None
        return torch.nn.functional.cross_entropy(scores, rows.labels[index].to(scores.device))


@torch.no_grad()
def start_label_head(classifier: Classifier, fit: ClassificationRows) -> LabelHead:
    """One vector per label that starts as the model's own reading of the label's name: its first
    token's output row (with `length_norm` divided by the word's tokens, as its score is; averaged
    over a label's words), and a bias that makes the head score the `fit` rows (content-free
    inputs) as the frozen words do, up to a per-row constant. The bias carries what a name's later
    tokens add, which its first token cannot ("card arrival" and "card linking" share " card")."""
    choices = classifier.choices
    divisors = torch.tensor(_divisors(classifier), dtype=torch.float32)[:, None]
    rows = classifier.backbone.output_rows(choices.first_ids).cpu() / divisors
    counts = torch.bincount(choices.owner, minlength=choices.n_labels).float()[:, None]
    vectors = torch.zeros(choices.n_labels, rows.shape[1]).index_add(0, choices.owner, rows) / counts
    words = classifier.with_label_head(None).calibrated(None)
    gap = words.predict_proba(fit).log() - words.slot_states(fit) @ vectors.T  # [n, L]
    gap = gap - gap.mean(1, keepdim=True)  # a row's constant is free (its softmax ignores it)
    return LabelHead(vectors, gap.mean(0))


@torch.no_grad()
def fit_label_head(classifier: Classifier, rows: ClassificationRows) -> LabelHead:
    """One vector per label fitted to labelled rows: a logistic regression (logistic.py) on the rows'
    hidden states at the label slot as `classifier` reads them (its prompt in place), so the head
    starts where a linear probe of the prompted model ends (LP-FT: training then moves the prompt
    under a head that already separates the labels, instead of under one that reads names)."""
    assert rows.labels is not None
    weight, bias = fit_logistic(classifier.with_label_head(None).slot_states(rows), rows.labels, len(classifier.labels))
    return LabelHead(weight, bias)


@dataclass
class RowToScore:
    """A row to classify: its task's classifier, the prefix it follows, its ids before and after the slot."""

    classifier: Classifier
    prefix: Prefix
    body: list[int]
    after: list[int]


def label_scores(rows: list[RowToScore]) -> list[torch.Tensor]:
    """Each row's [L] label scores (log of mean word probability, up to a per-row constant, exact
    with `length_norm`); the rows may belong to different tasks (prompts, templates, verbalizers)
    and run as one batch.

    One forward pass per batch: after each row's own tokens comes its label trie (`LabelTrie`: the
    choices' words, each followed by the input after a label slot), every distinct prefix once, at
    the positions it would have right after the row, under a tree mask: a node sees the row and its
    own ancestors, nothing else. A first token is read at the row's last token from the label rows of
    the output projection only; every later token at its parent node, over the whole vocabulary. A
    row of a task with one vector per label feeds nothing after its own tokens (`_head_scores`)."""
    tries = [row.classifier.trie(row.after) for row in rows]
    packed = []
    for row, trie in zip(rows, tries):
        fed, n = trie.fed, len(row.body)
        ids = [*row.body, *(trie.tokens[k] for k in fed)]
        offsets = [*range(n), *(n + trie.depth[k] - 1 for k in fed)]  # a node at its place right after the row
        nodes, last = [-1] * n + fed, [-1] * n + [trie.last[k] for k in fed]
        packed.append(BatchRow(row.classifier.lm, row.prefix, ids, offsets, nodes, last))
    out = run_rows(packed)
    slot = _slot_hidden(rows, out.hidden)
    result: list[torch.Tensor] = [slot[0, :0]] * len(rows)
    by_words = [r for r, row in enumerate(rows) if row.classifier.label_head is None]
    for r, scores in _head_scores(rows, slot).items():
        result[r] = scores
    if not by_words:
        return result
    first = dict(zip(by_words, _first_scores([rows[r] for r in by_words], slot[by_words])))
    where: list[tuple[int, int]] = []  # (row, column) of each fed node
    parents, tokens = [], []  # each node below the first tokens: its parent (index into `where`), its token
    owners, edges, in_word = [], [], []  # each choice's nodes below its first: choice, edge, in its word?
    choice = 0
    for r in by_words:
        row, trie, edge = rows[r], tries[r], {}
        for column, k in enumerate(trie.fed, start=len(row.body)):
            for c in trie.children[k]:
                edge[c] = len(tokens)
                parents.append(len(where))
                tokens.append(trie.tokens[c])
            where.append((r, column))
        for path, word in zip(trie.paths, trie.words):
            owners += [choice] * (len(path) - 1)
            edges += [edge[node] for node in path[1:]]
            in_word += [j < word for j in range(1, len(path))]
            choice += 1
    flat = torch.cat([first[r] for r in by_words])  # choice scores of every row, row after row
    after = torch.zeros_like(flat)  # log-probabilities of the input that follows a slot
    if where:
        at = torch.tensor(where).to(out.hidden.device)
        edge_tokens, edge_parents = torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long)
        logp = rows[0].classifier.backbone.token_log_probs(out.hidden[at[:, 0], at[:, 1]], edge_tokens, edge_parents)
        logp = logp[torch.tensor(edges, device=logp.device)]
        word = torch.tensor(in_word, device=logp.device)
        owner = torch.tensor(owners, device=logp.device)
        flat = flat.index_add(0, owner[word], logp[word])
        after = after.index_add(0, owner[~word], logp[~word])
    # label_scores: mean divides each word's log-probability by its own tokens (not by the input
    # after the slot, the same for every word); sum keeps it whole
    divisors = [d for r in by_words for d in _divisors(rows[r].classifier)]
    flat = flat / torch.tensor(divisors).to(flat.device) + after
    per_row = dict(zip(by_words, flat.split([len(rows[r].classifier.choices.ids) for r in by_words])))
    for members in _by_task([rows[r].classifier for r in by_words]).values():
        members = [by_words[i] for i in members]
        labels = _label_values(rows[members[0]].classifier, torch.stack([per_row[r] for r in members]))
        for r, scores in zip(members, labels):
            result[r] = scores
    return result


def _head_scores(rows: list[RowToScore], slot_hidden: torch.Tensor) -> dict[int, torch.Tensor]:
    """Row -> [L] label scores, for the rows whose labels are read by their own vectors (`LabelHead`,
    one projection per task), less the calibration prior."""
    read = [r for r, row in enumerate(rows) if row.classifier.label_head is not None]
    out: dict[int, torch.Tensor] = {}
    for members in _by_task([rows[r].classifier for r in read]).values():
        members = [read[i] for i in members]
        classifier = rows[members[0]].classifier
        scores = classifier.label_head.scores(slot_hidden[members])
        if classifier.log_prior is not None:
            scores = scores - classifier.log_prior.to(scores.device)
        out.update(zip(members, scores))
    return out


def label_answers(rows: list[RowToScore], k: int = 1, pass_rows: int | None = None) -> list[list[int]]:
    """Each row's k best labels, best first (ties to the lower index): exactly the first k of the
    order of its `label_scores`, found by best-first expansion of its label trie, which feeds only
    the prefixes that could still win instead of the whole trie.

    Why the pruning is exact: every score below a first token is a log-probability, at most 0, so a
    choice scores at most what its path has gathered so far, (known word tokens) / divisor + (known
    tokens after the slot), where the divisor is 1, or with `length_norm` the word's full length,
    known before anything is scored: so the bound holds for `label_scores: mean` too (the mean of a
    prefix by its own length would not bound the word's). A label's bound is the verbalizer's
    formula over its choices' bounds (log of the mean probability: increasing in each) minus its
    calibration prior. First-token scores, learned label rows included, are exact from the row's own
    pass, whatever their per-row constant. A row stops once k complete labels score strictly above
    every incomplete label's bound; until then each step feeds, for all rows still searching in one
    batch and on top of their key/value caches (the tree mask of `label_scores`), the nodes
    `_Search.next_step` picks, padded out with further nodes of the same paths (`_Search.filled`).
    The rows' own pass runs `pass_rows` rows at a time (all at once by default) and the search runs
    over all of them: a step reads every weight of the model, so many rows a step amortise it, and a
    narrower step lets the best complete labels rise before more prefixes are fed. A fed node's
    children get upper bounds on their scores (`Backbone.token_log_prob_bounds`), which keep the
    pruning exact; the complete labels that rank the others are resolved to exact scores
    (`_resolve`) before they are compared, so the answer and its order are the full scoring's up to
    float rounding: the two paths' scores agree to ~1e-5, so only a tie that close could go the
    other way."""
    backbone = rows[0].classifier.backbone
    slot, contexts = _rows_pass(rows, pass_rows or len(rows))
    answers: list[list[int]] = [[] for _ in rows]
    for r, scores in _head_scores(rows, slot).items():  # read in one projection: nothing to search
        answers[r] = sorted(range(len(scores)), key=lambda label: -float(scores[label]))[:k]  # stable: ties to the lower index
    by_words = [r for r, row in enumerate(rows) if row.classifier.label_head is None]
    if not by_words:
        return answers
    context = contexts[0] if len(contexts) == 1 else join_contexts(contexts)
    first = _first_scores([rows[r] for r in by_words], slot[by_words])
    searching = [_Search(rows[r], scores.tolist(), k) for r, scores in zip(by_words, first)]
    if len(by_words) < len(rows):
        context.select(torch.tensor(by_words, device=backbone.device))
    searches = list(searching)
    while True:
        width = max(1, STEP_TOKENS // len(searching))
        steps = [s.next_step(bounds, width) for s, bounds in zip(searching, _label_bounds(searching))]
        if any(unsure for _, unsure in steps):  # the labels the search ranks by must be exact first
            _resolve(backbone, searching, [unsure for _, unsure in steps])
            continue
        nodes = [feed for feed, _ in steps]
        keep = [i for i, fed in enumerate(nodes) if fed]
        if not keep:
            break
        if len(keep) < len(searching):  # these rows have their answers: they leave the batch
            context.select(torch.tensor(keep, device=backbone.device))
            searching, nodes = [searching[i] for i in keep], [nodes[i] for i in keep]
        room = max(map(len, nodes))
        nodes = [search.filled(row, room) for search, row in zip(searching, nodes)]
        hidden, context = _feed(backbone, context, searching, nodes)
        fed = [(i, j) for i, row in enumerate(nodes) for j in range(len(row))]
        children = [searching[i].trie.children[nodes[i][j]] for i, j in fed]
        parents = [f for f, kin in enumerate(children) for _ in kin]
        tokens = [searching[i].trie.tokens[c] for (i, _), kin in zip(fed, children) for c in kin]
        at = torch.tensor(fed, device=hidden.device)
        states = hidden[at[:, 0], at[:, 1]]
        edge_tokens, edge_parents = torch.tensor(tokens, dtype=torch.long), torch.tensor(parents, dtype=torch.long)
        logp = backbone.token_log_prob_bounds(states, edge_tokens, edge_parents).tolist()
        for state, (i, j), kin in zip(states, fed, children):
            searching[i].advance(nodes[i][j], dict(zip(kin, logp[: len(kin)])), state)
            logp = logp[len(kin) :]
    for r, search in zip(by_words, searches):
        answers[r] = search.answer
    return answers


def _rows_pass(rows: list[RowToScore], size: int) -> tuple[torch.Tensor, list[Context]]:
    """The rows' own pass, `size` rows at a time (each part padded to its own longest row): [B, H]
    their states at the slot and each part's keys (joined only where a search follows)."""
    slots, contexts = [], []
    for start in range(0, len(rows), size):
        part = rows[start : start + size]
        out = run_rows([BatchRow(row.classifier.lm, row.prefix, list(row.body)) for row in part])
        slots.append(_slot_hidden(part, out.hidden))
        contexts.append(out.context)
    return torch.cat(slots), contexts


def _resolve(backbone: Backbone, searches: list[_Search], unsure: list[list[int]]) -> None:
    """The exact scores of the `unsure` nodes' children (per search, nodes it has fed), in one pass."""
    nodes = [(s, node) for s, row in zip(searches, unsure) for node in row]
    children = [s.trie.children[node] for s, node in nodes]
    states = torch.stack([s.states[node] for s, node in nodes])
    tokens = torch.tensor([s.trie.tokens[c] for (s, _), kin in zip(nodes, children) for c in kin], dtype=torch.long)
    parents = torch.tensor([f for f, kin in enumerate(children) for _ in kin], dtype=torch.long)
    logp = backbone.token_log_probs(states, tokens, parents).tolist()
    for (s, node), kin in zip(nodes, children):
        s.resolve(node, dict(zip(kin, logp[: len(kin)])))
        logp = logp[len(kin) :]


def _feed(
    backbone: Backbone, context: Context, searches: list[_Search], nodes: list[list[int]]
) -> tuple[torch.Tensor, Context]:
    """Trie nodes of each row through the model, after the row and the nodes' ancestors (in `context`
    or fed with them); [B, N, H] their hidden states (rows right-padded) and the context grown by them."""
    width = max(len(row) for row in nodes)

    def padded(values: list[int], fill: int) -> list[int]:
        return values + [fill] * (width - len(values))

    tries = [s.trie for s in searches]
    layout = Layout.of(
        torch.tensor([padded([s.position(n) for n in row], 0) for s, row in zip(searches, nodes)]),
        torch.tensor([padded([1] * len(row), 0) for row in nodes]),
        torch.tensor([padded(row, -1) for row in nodes]),
        torch.tensor([padded([trie.last[n] for n in row], -1) for trie, row in zip(tries, nodes)]),
    )
    ids = torch.tensor([padded([trie.tokens[n] for n in row], PAD_ID) for trie, row in zip(tries, nodes)])
    return backbone.run(backbone.embed(ids), layout, context)


class _Search:
    """One row's best-first search over its label trie: what each choice's path has gathered.

    A fed node's children get upper bounds on their scores (`Backbone.token_log_prob_bounds`, a few
    percent of the exact cost), enough to rule most labels out; a node becomes exact (`resolve`)
    when a label through it is among the k best complete ones, the labels that rank the rest."""

    def __init__(self, row: RowToScore, first: list[float], k: int) -> None:
        self.classifier = row.classifier
        self.trie = row.classifier.trie(row.after)
        self.k = min(k, row.classifier.choices.n_labels)
        self.divisor = _divisors(row.classifier)
        self.word = first  # per choice: its word's log-probability so far
        self.after = [0.0] * len(first)  # per choice: the input after the slot, so far
        self.known = [1] * len(first)  # per choice: nodes of its path scored so far
        owner = row.classifier.choices.owner.tolist()
        labels = range(row.classifier.choices.n_labels)
        self.members = [[c for c, o in enumerate(owner) if o == label] for label in labels]  # label -> choices
        self.base = row.prefix.length + len(row.body) - 1  # the position of the row's last token
        self.bounded: dict[int, dict[int, float]] = {}  # fed node -> its children's bounds, until resolved
        self.states: dict[int, torch.Tensor] = {}  # fed node -> its hidden state
        self.answer: list[int] = []
        self.rest: list[int] = []  # the last step's further path nodes (`filled`)

    def position(self, node: int) -> int:
        return self.base + self.trie.depth[node]

    def done(self, choice: int) -> bool:
        return self.known[choice] == len(self.trie.paths[choice])

    def bounds(self) -> list[float]:
        """Per choice its score, exact when its path is done and resolved, else an upper bound."""
        return [w / d + a for w, d, a in zip(self.word, self.divisor, self.after)]

    def unsure(self, label: int) -> list[int]:
        """The fed nodes on `label`'s paths whose children's scores are still bounds."""
        return sorted({n for c in self.members[label] for n in self.trie.paths[c][: self.known[c] - 1] if n in self.bounded})

    def next_step(self, labels: list[float], width: int) -> tuple[list[int], list[int]]:
        """(nodes to feed next, ancestors first; nodes to resolve), both empty once the answer is
        known (then in `answer`); `labels`: the label formula over `bounds`. The k best complete
        labels are made exact first (with every complete label whose bound is above the k-th
        best exact one, all in one pass): they decide what the rest must beat. Until k labels are
        complete there is nothing to prune against: the best-bounded incomplete labels' best choices
        are completed in one step each, whole paths (for a sure model that is the answer, and the
        search ends). Then every label that can still reach the top k has its best choice's open
        node fed, the best-bounded `width` first: one forward pass costs about as much for one node
        a row as for dozens (the weights are read once), so a step feeds all that the search can use."""
        complete = [all(self.done(c) for c in m) for m in self.members]
        ranked = sorted((label for label, full in enumerate(complete) if full), key=lambda label: -labels[label])
        open_nodes = {label: self.unsure(label) for label in ranked}
        settled = [labels[label] for label in ranked if not open_nodes[label]]
        threshold = settled[self.k - 1] if len(settled) >= self.k else -math.inf  # the k-th best exact label
        # every complete label that might rank above it, in one pass: then the top k are exact
        unsure = sorted({n for label in ranked if labels[label] >= threshold for n in open_nodes[label]})
        if unsure:
            return [], unsure
        incomplete = [label for label, full in enumerate(complete) if not full]
        bound = max((labels[label] for label in incomplete), default=-math.inf)
        # strictly above: an incomplete label whose bound ties might still tie, and win on its index
        winners = [label for label in ranked if labels[label] > bound] if incomplete else ranked
        if len(winners) >= self.k:
            self.answer = winners[: self.k]  # sorted() is stable: ties go to the lower index
            return [], []
        filling = len(ranked) < self.k  # fewer than k complete labels: nothing to prune against yet
        floor = -math.inf if filling else labels[ranked[self.k - 1]]  # the k-th best complete label
        hopeful = sorted((label for label in incomplete if labels[label] >= floor), key=lambda label: -labels[label])
        choices, nodes, rest = self.bounds(), set(), []
        for label in hopeful[: self.k - len(ranked)] if filling else hopeful[:width]:
            choice = max((c for c in self.members[label] if not self.done(c)), key=lambda c: choices[c])
            path, known = self.trie.paths[choice], self.known[choice]
            nodes.update(path[known - 1 : len(path) - 1] if filling else [path[known - 1]])
            rest += path[known : len(path) - 1]
        assert nodes, "an unfinished search always has a node to feed"
        self.rest = list(dict.fromkeys(n for n in rest if n not in nodes))
        return sorted(nodes), []  # pre-order: an ancestor before its descendants

    def filled(self, nodes: list[int], room: int) -> list[int]:
        """`nodes` (this step's, from `next_step`) and, up to `room` in all, the nodes further down
        the same labels' paths, best-bounded label first: the slots that padding to the batch's
        widest row would waste feed what the next steps would likely ask for. Each label's share is
        a prefix of its path, so an ancestor is always fed before or with its descendants."""
        return sorted({*nodes, *self.rest[: max(0, room - len(nodes))]})

    def advance(self, node: int, bounds: dict[int, float], state: torch.Tensor) -> None:
        """`node` was fed: its children's score bounds move every choice waiting there one node on."""
        self.bounded[node], self.states[node] = bounds, state
        for c, path in enumerate(self.trie.paths):
            if not self.done(c) and path[self.known[c] - 1] == node:
                self._add(c, self.known[c], bounds[path[self.known[c]]])
                self.known[c] += 1

    def resolve(self, node: int, scores: dict[int, float]) -> None:
        """`node`'s children's exact scores replace their bounds on every path that has used them."""
        bounds = self.bounded.pop(node)
        for c, path in enumerate(self.trie.paths):
            at = path.index(node) + 1 if node in path[: self.known[c] - 1] else 0
            if at:
                self._add(c, at, scores[path[at]] - bounds[path[at]])

    def _add(self, choice: int, at: int, value: float) -> None:
        """Add `value` to the score of `choice`'s path node `at` (its word's or the input after it)."""
        if at < self.trie.words[choice]:
            self.word[choice] += value
        else:
            self.after[choice] += value


def _by_task(classifiers: list[Classifier]) -> dict[int, list[int]]:
    """Indices grouped by classifier (a batch's rows of one task run their label formula together)."""
    groups: dict[int, list[int]] = {}
    for i, classifier in enumerate(classifiers):
        groups.setdefault(id(classifier), []).append(i)
    return groups


def _slot_hidden(rows: list[RowToScore], hidden: torch.Tensor) -> torch.Tensor:
    """[B, H] each row's hidden state at its last own token, where the label's first token is read."""
    bodies = torch.tensor([len(row.body) for row in rows])
    return hidden[torch.arange(len(rows)), (bodies - 1).to(hidden.device)]


def _first_scores(rows: list[RowToScore], slot_hidden: torch.Tensor) -> list[torch.Tensor]:
    """Per row, [C] its choices' first-token scores (`_first_token_scores`, one call per task)."""
    first: list[torch.Tensor] = [slot_hidden[0, :0]] * len(rows)
    for members in _by_task([row.classifier for row in rows]).values():
        for r, scores in zip(members, _first_token_scores(rows[members[0]].classifier, slot_hidden[members])):
            first[r] = scores
    return first


def _divisors(classifier: Classifier) -> list[int]:
    """Per choice what its word's log-probability is divided by: its tokens with `length_norm`, else 1."""
    return [len(ids) if classifier.length_norm else 1 for ids in classifier.choices.ids]


def _label_values(classifier: Classifier, choice_scores: torch.Tensor) -> torch.Tensor:
    """[B, C] choice scores -> [B, L] label scores: the verbalizer's formula, less the calibration prior."""
    labels = classifier.choices.label_scores(choice_scores)
    if classifier.log_prior is not None:
        labels = labels - classifier.log_prior.to(labels.device)
    return labels


def _label_bounds(searches: list[_Search]) -> list[list[float]]:
    """Each search's label bounds, computed one batch per task."""
    out: list[list[float]] = [[] for _ in searches]
    for members in _by_task([search.classifier for search in searches]).values():
        bounds = torch.tensor([searches[i].bounds() for i in members])
        for i, values in zip(members, _label_values(searches[members[0]].classifier, bounds).tolist()):
            out[i] = values
    return out


NO_LABEL_TOKENS = LabelTrie.of([], [])  # what a row whose labels are read by their own vectors feeds after it

# Label nodes one step of the pruned search feeds at most, over the batch. A step reads every weight
# of the model whatever it feeds: on SmolLM2-135M, 32 Banking77 rows, untrained prompt (2 CPU cores),
# 16 nodes a step gave 3.0 rows/s and 1024 gave 6.6, feeding about the same nodes (49 and 55 a row).
STEP_TOKENS = 1024
# Rows that one pruned search runs over (`Classifier.search_groups`), and the keys their cache may hold.
SEARCH_ROWS = 128
SEARCH_KEYS = 8192


def _first_token_scores(classifier: Classifier, hidden: torch.Tensor) -> torch.Tensor:
    """[B, C] scores of each choice's first token at the slot: logits of the label rows (learned ones
    where the classifier has them), up to a per-row constant; with `length_norm` exact
    log-probabilities, since a per-row constant divided by unequal token counts would not cancel."""
    ids, backbone = classifier.choices.first_ids, classifier.backbone
    if classifier.label_rows is None and not classifier.length_norm:
        return backbone.logits_for(hidden, ids)
    if classifier.label_rows is None:  # exact: the scores and their normaliser from the same logits
        vocab = backbone.logits(hidden)
        return vocab[:, ids.to(vocab.device)] - vocab.logsumexp(-1, keepdim=True)
    rows = classifier.label_rows.to(hidden.device).float()
    learned = backbone.cap_logits(hidden.float() @ rows.T + backbone.output_bias(ids))
    if not classifier.length_norm:
        return learned
    # the learned rows stand in for the first tokens' own rows in the normaliser
    vocab = backbone.logits(hidden).index_fill(-1, ids.unique().to(hidden.device), float("-inf"))
    return learned - torch.cat([vocab, learned], dim=-1).logsumexp(-1, keepdim=True)
