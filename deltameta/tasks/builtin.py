"""Built-in task families, generated procedurally from a seed (no download).

Each family draws tasks with a *hidden rule* that a model can only infer from the support
examples: which arbitrary label word names which word category, which key of a record is
asked for, which Caesar shift or string operation is applied, which secret word code is used,
which number base and operator an unfamiliar symbol stands for, which linear function maps x to
y. Tasks of a family differ in the rule's parameters; the same ``(seed, family, index)`` always
gives the same task. Inputs are short (well under 60 characters) so a 135M model can learn them.

Families (``MC`` = multiple choice, scored by option log-likelihood):

* ``word_category`` (MC): words of 2-4 categories, each category named by a random label word.
* ``number_property`` (MC): a number 0-99 labelled by a hidden property with two random words.
* ``kv_lookup`` (MC): a record ``ka=37 mo=12 zu=85``; the answer is the value of a hidden key.
* ``caesar``: a word shifted by a hidden k, optionally reversed and upper-cased.
* ``string_op``: a hidden string operation (reverse, double letters, ...) plus a hidden affix.
* ``word_map``: every word replaced through a hidden code book.
* ``base_arith``: ``a # b`` where ``#`` hides +, - or * and the numbers are in a hidden base.
* ``linear``: ``x`` -> ``a*x + b`` with hidden a, b.
* ``position_pick`` (MC): 3-6 numbers or words; the answer is the item at a hidden position.
* ``number_compare`` (MC): three numbers; the answer is the largest, smallest, middle one, or the
  one closest to / farthest from a hidden number.
* ``word_property`` (MC): a word labelled by a hidden property (length, a letter, ...) with two
  random words.
* ``category_count`` (MC): three words of 2-3 categories; the answer (0-3) is how many belong to a
  hidden one of them.
* ``category_pick`` (MC): three words of three categories; the answer is the word of a hidden one of
  them.
* ``number_pick`` (MC): three numbers 0-99; the answer is the one with a hidden property (a property of
  ``number_property``), which the other two lack. 80 of its 99 distinct rules are "greater than p"
  (a draw picks one of five kinds uniformly, so about half of 32 drawn rules), whose answer is
  always the largest of the three, as in ``number_compare``'s "largest" rule.
* ``string_op_pick`` (MC): two words and three options, each the words through a different string
  operation of ``string_op`` (reverse, upper case, doubled letters, ...); the answer is the one
  made by a hidden operation, the other two by two hidden distractor operations fixed per task
  (252 rules: 9 operations x 28 distractor pairs; ``last_word`` is left out, as its output is an
  item of the input, like ``position_pick``'s answers). Its options differ in token count, so the
  summed log-likelihood favours short ones; length-normalised accuracy is the telling score there.

``tasks=builtin`` alone reads the first eight (:data:`DEFAULT_FAMILIES`); the last seven are read
only when named (``builtin:position_pick,...``), so results made before they existed reproduce.
"""

from __future__ import annotations

import random
import string
import warnings
from typing import Callable, Sequence

from deltameta.errors import ConfigError
from deltameta.tasks.seeding import derive_seed
from deltameta.tasks.task import Example, PromptTemplate, Task

SOURCE = "builtin"
TEMPLATE = PromptTemplate(input_format="Input: {input}\nOutput:", target_format=" {target}")

CATEGORIES: dict[str, tuple[str, ...]] = {
    "animal": ("cat", "dog", "horse", "tiger", "wolf", "mouse", "eagle", "snake", "whale", "goat", "frog", "bear"),
    "fruit": ("apple", "pear", "plum", "grape", "lemon", "mango", "peach", "cherry", "melon", "kiwi", "lime", "fig"),
    "color": ("red", "blue", "green", "yellow", "purple", "orange", "pink", "brown", "black", "white", "gray", "teal"),
    "vehicle": ("car", "bus", "truck", "train", "bike", "boat", "plane", "taxi", "van", "tram", "ship", "scooter"),
    "body": ("hand", "foot", "knee", "elbow", "nose", "ear", "eye", "chin", "neck", "toe", "wrist", "lip"),
    "tool": ("hammer", "saw", "drill", "wrench", "knife", "axe", "rake", "shovel", "chisel", "pliers", "file", "hoe"),
    "weather": ("rain", "snow", "fog", "wind", "hail", "storm", "sleet", "frost", "mist", "sun", "cloud", "thunder"),
    "clothing": ("shirt", "coat", "hat", "sock", "shoe", "scarf", "glove", "dress", "skirt", "belt", "boot", "vest"),
    "music": ("piano", "drum", "flute", "violin", "guitar", "harp", "cello", "tuba", "banjo", "oboe", "horn", "lute"),
    "job": ("baker", "doctor", "nurse", "pilot", "farmer", "judge", "chef", "clerk", "miner", "tailor", "poet", "guard"),
}
#: Arbitrary label words (disjoint from the category words).
LABELS = (
    "zap", "mop", "kin", "vex", "dux", "quill", "blip", "snorf", "gleb", "wub", "tarn", "yolk", "fizz", "plonk",
    "grue", "jinx", "mauve", "nib", "orb", "pith", "rune", "sable", "tusk", "umber", "veil", "wisp", "yarrow", "zeal",
)
#: Short common words used as string-function inputs.
WORDS = (
    "cat", "dog", "sun", "tree", "book", "milk", "fish", "door", "lamp", "rock", "star", "moon", "cake", "frog",
    "ship", "bird", "rain", "salt", "gold", "wind", "leaf", "ring", "hat", "cup", "pen", "box", "key", "map",
    "road", "king", "song", "fire", "snow", "sand", "wolf", "bell", "corn", "desk", "fork", "gate", "hill",
    "iron", "jam", "kite", "lake", "nest", "oak", "pig", "rose", "seed", "toy", "vase", "wall", "yard", "zoo",
)
OPERATOR_SYMBOLS = ("@", "#", "&", "%", "$", "~", "^")
BASES = (2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 16)


def _in_base(value: int, base: int) -> str:
    digits = string.digits + string.ascii_lowercase
    if value == 0:
        return "0"
    sign, value = ("-", -value) if value < 0 else ("", value)
    out = []
    while value:
        value, rest = divmod(value, base)
        out.append(digits[rest])
    return sign + "".join(reversed(out))


# ---------------------------------------------------------------------------------------------
# one generator per family: rng -> (rule key, description, example factory)

Factory = Callable[[random.Random], Example]


def _word_category(rng: random.Random):
    categories = rng.sample(sorted(CATEGORIES), rng.randint(2, 4))
    labels = rng.sample(LABELS, len(categories))

    def make(r: random.Random) -> Example:
        index = r.randrange(len(categories))
        words = r.sample(CATEGORIES[categories[index]], r.choice((1, 1, 2)))
        return Example(input=" and ".join(words), target=labels[index], options=list(labels))

    rule = ", ".join(f"{c} -> {label}" for c, label in zip(categories, labels))
    return (tuple(categories), tuple(labels)), f"word category labels: {rule}", make


_PROPERTIES = {
    "even": (lambda r: None, lambda x, p: x % 2 == 0, "is even"),
    "greater": (lambda r: r.randint(10, 89), lambda x, p: x > p, "is greater than {}"),
    "divisible": (lambda r: r.randint(3, 9), lambda x, p: x % p == 0, "is divisible by {}"),
    "has_digit": (lambda r: r.randint(0, 9), lambda x, p: str(p) in str(x), "contains the digit {}"),
    "digit_sum_even": (lambda r: None, lambda x, p: sum(map(int, str(x))) % 2 == 0, "has an even digit sum"),
}


def _draw_property(rng: random.Random, properties: dict):
    """A hidden property drawn from ``properties``: its name, parameter, test and description template."""
    name = rng.choice(sorted(properties))
    draw, test, text = properties[name]
    return name, draw(rng), test, text


def _labelled_property(rng: random.Random, properties: dict, draw_input: Callable[[random.Random], object], noun: str):
    """A hidden property of the input (drawn from ``properties``) named by two random label words."""
    name, parameter, test, text = _draw_property(rng, properties)
    yes, no = rng.sample(LABELS, 2)

    def make(r: random.Random) -> Example:
        # draw positives and negatives equally often so rare properties still show both labels
        want = r.random() < 0.5
        for _ in range(200):
            value = draw_input(r)
            if bool(test(value, parameter)) == want:
                break
        return Example(input=str(value), target=yes if test(value, parameter) else no, options=[yes, no])

    return (name, parameter, yes, no), f"'{yes}' if the {noun} {text.format(parameter)}, else '{no}'", make


def _number_property(rng: random.Random):
    return _labelled_property(rng, _PROPERTIES, lambda r: r.randint(0, 99), "number")


def _kv_lookup(rng: random.Random):
    keys = ["".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou")) for _ in range(6)]
    keys = sorted(set(keys))
    target_key = rng.choice(keys)
    others = [k for k in keys if k != target_key]

    def make(r: random.Random) -> Example:
        chosen = r.sample(others, min(2, len(others))) + [target_key]
        r.shuffle(chosen)
        values = r.sample(range(10, 100), len(chosen))
        record = " ".join(f"{k}={v}" for k, v in zip(chosen, values))
        options = [str(v) for v in values]
        return Example(input=record, target=str(values[chosen.index(target_key)]), options=options)

    return (tuple(keys), target_key), f"value of key '{target_key}' (keys {', '.join(keys)})", make


def _caesar(rng: random.Random):
    shift, reverse, upper = rng.randint(1, 25), rng.random() < 0.5, rng.random() < 0.5

    def make(r: random.Random) -> Example:
        word = " ".join(r.sample(WORDS, r.randint(1, 2)))
        out = "".join(chr((ord(c) - 97 + shift) % 26 + 97) if c.isalpha() else c for c in word)
        out = out[::-1] if reverse else out
        return Example(input=word, target=out.upper() if upper else out)

    flags = (" then reversed" if reverse else "") + (" in upper case" if upper else "")
    return (shift, reverse, upper), f"Caesar shift by {shift}{flags}", make


_STRING_OPS: dict[str, Callable[[list[str]], str]] = {
    "reverse": lambda w: " ".join(w)[::-1],
    "upper": lambda w: " ".join(w).upper(),
    "title": lambda w: " ".join(x.capitalize() for x in w),
    "double_letters": lambda w: " ".join("".join(c * 2 for c in x) for x in w),
    "drop_vowels": lambda w: " ".join("".join(c for c in x if c not in "aeiou") or x for x in w),
    "sort_letters": lambda w: " ".join("".join(sorted(x)) for x in w),
    "first_letters": lambda w: "".join(x[0] for x in w),
    "last_word": lambda w: w[-1],
    "reverse_words": lambda w: " ".join(reversed(w)),
    "swap_ends": lambda w: " ".join(x[-1] + x[1:-1] + x[0] if len(x) > 1 else x for x in w),
}


def _string_op(rng: random.Random):
    op = rng.choice(sorted(_STRING_OPS))
    affix = "".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(0, 2)))
    prefix = rng.random() < 0.5
    function = _STRING_OPS[op]

    def make(r: random.Random) -> Example:
        words = r.sample(WORDS, r.randint(2 if op in ("first_letters", "last_word", "reverse_words") else 1, 3))
        out = function(words)
        return Example(input=" ".join(words), target=(affix + out) if prefix else (out + affix))

    where = "prefix" if prefix else "suffix"
    return (op, affix, prefix and bool(affix)), f"{op}" + (f" with {where} '{affix}'" if affix else ""), make


def _word_map(rng: random.Random):
    vocabulary = rng.sample(WORDS, 6)
    codes = rng.sample(LABELS, 6)
    table = dict(zip(vocabulary, codes))

    def make(r: random.Random) -> Example:
        words = [r.choice(vocabulary) for _ in range(r.randint(1, 3))]
        return Example(input=" ".join(words), target=" ".join(table[w] for w in words))

    return tuple(sorted(table.items())), "code book: " + ", ".join(f"{k}->{v}" for k, v in table.items()), make


def _base_arith(rng: random.Random):
    base, op, symbol = rng.choice(BASES), rng.choice("+-*"), rng.choice(OPERATOR_SYMBOLS)
    compute = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}[op]
    top = max(base * base, 16) if op != "*" else max(base * 2, 12)

    def make(r: random.Random) -> Example:
        a, b = r.randrange(top), r.randrange(top)
        return Example(input=f"{_in_base(a, base)} {symbol} {_in_base(b, base)}", target=_in_base(compute(a, b), base))

    return (base, op, symbol), f"'{symbol}' means '{op}', numbers in base {base}", make


def _linear(rng: random.Random):
    a, b = rng.randint(1, 9), rng.randint(-9, 9)

    def make(r: random.Random) -> Example:
        x = r.randint(0, 99)
        return Example(input=str(x), target=str(a * x + b))

    return (a, b), f"y = {a}*x {'+' if b >= 0 else '-'} {abs(b)}", make


def _position_pick(rng: random.Random):
    kind, length = rng.choice(("number", "word")), rng.randint(3, 6)
    position = rng.randrange(length)

    def make(r: random.Random) -> Example:
        items = [str(v) for v in r.sample(range(10, 100), length)] if kind == "number" else r.sample(WORDS, length)
        return Example(input=" ".join(items), target=items[position], options=list(items))

    return (kind, length, position), f"item {position + 1} of {length} {kind}s", make


_COMPARISONS: dict[str, Callable[[list[int], int], int]] = {
    "largest": lambda xs, c: max(xs),
    "smallest": lambda xs, c: min(xs),
    "middle": lambda xs, c: sorted(xs)[1],
    "closest": lambda xs, c: min(xs, key=lambda x: abs(x - c)),
    "farthest": lambda xs, c: max(xs, key=lambda x: abs(x - c)),
}


def _number_compare(rng: random.Random):
    name = rng.choice(sorted(_COMPARISONS))
    center = rng.randint(10, 99) if name in ("closest", "farthest") else None
    pick = _COMPARISONS[name]

    def make(r: random.Random) -> Example:
        for _ in range(200):  # redraw ties (two numbers equally close to or far from the hidden number)
            numbers = r.sample(range(10, 100), 3)
            if center is None or len({abs(x - center) for x in numbers}) == 3:
                break
        options = [str(x) for x in numbers]
        return Example(input=" ".join(options), target=str(pick(numbers, center)), options=options)

    text = f"the {name} number" if center is None else f"the number {name} {'to' if name == 'closest' else 'from'} {center}"
    return (name, center), text, make


#: Words of 2-7 letters for word_property: the category words and the short words.
PROPERTY_WORDS = tuple(sorted({w for words in CATEGORIES.values() for w in words} | set(WORDS)))
_WORD_PROPERTIES = {
    "longer": (lambda r: r.randint(3, 5), lambda w, p: len(w) > p, "has more than {} letters"),
    "contains": (lambda r: r.choice("aeilnorst"), lambda w, p: p in w, "contains '{}'"),
    "starts_before": (lambda r: r.choice("dfhmps"), lambda w, p: w[0] < p, "starts before '{}' in the alphabet"),
    "ends_vowel": (lambda r: None, lambda w, p: w[-1] in "aeiou", "ends with a vowel"),
}


def _word_property(rng: random.Random):
    return _labelled_property(rng, _WORD_PROPERTIES, lambda r: r.choice(PROPERTY_WORDS), "word")


def _category_count(rng: random.Random):
    categories = rng.sample(sorted(CATEGORIES), rng.randint(2, 3))
    counted, others = categories[0], sorted(categories[1:])
    pool = [w for c in others for w in CATEGORIES[c]]

    def make(r: random.Random) -> Example:
        count = r.randint(0, 3)  # every answer equally often
        words = r.sample(CATEGORIES[counted], count) + r.sample(pool, 3 - count)
        r.shuffle(words)
        return Example(input=" ".join(words), target=str(count), options=["0", "1", "2", "3"])

    return (counted, tuple(others)), f"how many words are of category {counted} (others: {', '.join(others)})", make


def _category_pick(rng: random.Random):
    picked, *others = rng.sample(sorted(CATEGORIES), 3)
    others = sorted(others)

    def make(r: random.Random) -> Example:
        words = [r.choice(CATEGORIES[c]) for c in (picked, *others)]
        target = words[0]
        r.shuffle(words)
        return Example(input=" ".join(words), target=target, options=words)

    return (picked, tuple(others)), f"the word of category {picked} (others: {', '.join(others)})", make


def _number_pick(rng: random.Random):
    name, parameter, test, text = _draw_property(rng, _PROPERTIES)
    having = [x for x in range(100) if test(x, parameter)]
    lacking = [x for x in range(100) if not test(x, parameter)]

    def make(r: random.Random) -> Example:
        numbers = [r.choice(having), *r.sample(lacking, 2)]
        target = str(numbers[0])
        r.shuffle(numbers)
        options = [str(x) for x in numbers]
        return Example(input=" ".join(options), target=target, options=options)

    return (name, parameter), f"the number that {text.format(parameter)}", make


#: The operations of string_op_pick: those of string_op but ``last_word``, whose output is a word of the input.
_PICK_OPERATIONS = tuple(sorted(set(_STRING_OPS) - {"last_word"}))


def _string_op_pick(rng: random.Random):
    target, *others = rng.sample(_PICK_OPERATIONS, 3)
    others = sorted(others)
    operations = [_STRING_OPS[name] for name in (target, *others)]

    def make(r: random.Random) -> Example:
        for _ in range(200):  # redraw words whose three outputs are not all different
            words = r.sample(WORDS, 2)
            outputs = [operation(words) for operation in operations]
            if len(set(outputs)) == 3:
                break
        else:  # at most a few in a thousand pairs of words collide, so 200 draws always find one
            raise RuntimeError(f"string_op_pick: no two words give distinct outputs of {target}, {', '.join(others)}")
        answer = outputs[0]
        r.shuffle(outputs)
        return Example(input=" ".join(words), target=answer, options=outputs)

    return (target, tuple(others)), f"the words through {target} (others: {', '.join(others)})", make


#: family name -> rule generator.
FAMILIES = {
    "word_category": _word_category,
    "number_property": _number_property,
    "kv_lookup": _kv_lookup,
    "caesar": _caesar,
    "string_op": _string_op,
    "word_map": _word_map,
    "base_arith": _base_arith,
    "linear": _linear,
    "position_pick": _position_pick,
    "number_compare": _number_compare,
    "word_property": _word_property,
    "category_count": _category_count,
    "category_pick": _category_pick,
    "number_pick": _number_pick,
    "string_op_pick": _string_op_pick,
}
#: The families ``tasks=builtin`` reads when none are named: the first eight, so that recipes, runs and
#: published numbers made before the later families were added stay reproducible.
DEFAULT_FAMILIES = ("word_category", "number_property", "kv_lookup", "caesar", "string_op", "word_map", "base_arith",
                    "linear")


def _examples(make: Factory, rng: random.Random, count: int) -> list[Example]:
    """Draw up to ``count`` examples with distinct inputs (fewer if the input space is smaller)."""
    examples: list[Example] = []
    seen: set[str] = set()
    attempts = 0
    while len(examples) < count and attempts < count * 30:
        attempts += 1
        example = make(rng)
        if example.input in seen:
            continue
        seen.add(example.input)
        examples.append(example)
    return examples


def generate_family(family: str, num_tasks: int, examples_per_task: int = 64, seed: int = 0) -> list[Task]:
    """Generate ``num_tasks`` distinct tasks of one built-in family.

    Args:
        family: A key of :data:`FAMILIES`.
        num_tasks: How many tasks (distinct rules); fewer with a warning when the family's
            rule space is smaller.
        examples_per_task: Examples per task.
        seed: Base seed; the same arguments always give the same tasks.

    Returns:
        Tasks named ``{family}__{index:03d}``.

    Raises:
        ConfigError: unknown family or non-positive counts.
    """
    if family not in FAMILIES:
        raise ConfigError(f"unknown built-in task family '{family}'; valid families: {', '.join(FAMILIES)}.")
    if num_tasks < 1 or examples_per_task < 1:
        raise ConfigError(f"built-in tasks need num_tasks >= 1 and examples_per_task >= 1, got {num_tasks}, {examples_per_task}.")
    tasks: list[Task] = []
    seen: set = set()
    draws = 0
    while len(tasks) < num_tasks and draws < num_tasks * 50:
        rng = random.Random(derive_seed(seed, SOURCE, family, draws))
        draws += 1
        key, description, make = FAMILIES[family](rng)
        if key in seen:
            continue
        seen.add(key)
        examples = _examples(make, rng, examples_per_task)
        tasks.append(
            Task(
                name=f"{family}__{len(tasks):03d}",
                family=family,
                examples=examples,
                source=SOURCE,
                template=TEMPLATE,
                description=description,
            )
        )
    if len(tasks) < num_tasks:
        warnings.warn(f"built-in family '{family}' has only {len(tasks)} distinct rules; generated {len(tasks)} of {num_tasks} tasks.", stacklevel=2)
    return tasks


def read_builtin(
    families: Sequence[str] | None = None, tasks_per_family: int = 16, examples_per_task: int = 64, seed: int = 0
) -> list[Task]:
    """Generate tasks of several built-in families.

    Args:
        families: Family names (default: :data:`DEFAULT_FAMILIES`).
        tasks_per_family: Tasks per family.
        examples_per_task: Examples per task.
        seed: Base seed.

    Returns:
        The tasks, family by family.

    Raises:
        ConfigError: unknown family or bad counts.
    """
    tasks: list[Task] = []
    for family in families or DEFAULT_FAMILIES:
        tasks.extend(generate_family(family, tasks_per_family, examples_per_task, seed))
    return tasks
