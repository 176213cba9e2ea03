"""``deltameta tasks``: list the tasks of a source and show an encoded episode."""

from __future__ import annotations

import argparse

from deltameta.errors import ConfigError

_SOURCE_HELP = (
    "task source: a BIG-bench .json file or directory, a MetaICL .jsonl file, a .csv/.parquet file, "
    "'builtin' (or 'builtin:FAMILY,...'), or a hub id; join several with '+' (e.g. 'builtin:kv_lookup+DIR')"
)


def _columns(text: str) -> dict[str, str]:
    from deltameta.tasks.hf import normalize_columns, parse_columns

    try:
        columns = parse_columns(text, "--columns")
        normalize_columns(columns)
    except ConfigError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return columns


def _add_source_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", metavar="SOURCE", help=_SOURCE_HELP)
    parser.add_argument("--columns", type=_columns, default=None, help="column mapping for csv/parquet/jsonl/hub data, as in the other commands' columns key: "
                        "'{input: question, target: answer, options: choices, task: name}' or input=question,target=answer")
    parser.add_argument("--template", default=None, help="prompt template overriding the tasks' own: INPUT_FORMAT|||TARGET_FORMAT, e.g. '{input}\\nAnswer:||| {target}'")
    parser.add_argument("--builtin-tasks-per-family", type=int, default=16, help="tasks generated per built-in family (default: 16)")
    parser.add_argument("--seed", type=int, default=0, help="seed of built-in tasks, ratio splits and episodes (default: 0)")


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``tasks list`` and ``tasks show``."""
    parser = subparsers.add_parser("tasks", help="list task collections and show encoded episodes", description="Inspect task collections and few-shot episodes.")
    actions = parser.add_subparsers(dest="tasks_command", metavar="ACTION")
    listing = actions.add_parser(
        "list",
        help="list tasks with family, size, options and split",
        description="List every task of a source: name, family, number of examples, number of options (- for free-form) and split.",
    )
    _add_source_arguments(listing)
    listing.add_argument("--splits", default=None, help="splits.json (split -> task names) or ratios like train=0.8,dev=0.2 (split by family)")
    listing.set_defaults(func=_list)
    show = actions.add_parser(
        "show",
        help="render an encoded episode as the model sees it",
        description="Sample one episode of TASK and print its support and query rows decoded token by token, "
        "with the loss-masked answer span wrapped in [[...]].",
    )
    _add_source_arguments(show)
    show.add_argument("task", metavar="TASK", help="task name (see 'deltameta tasks list')")
    show.add_argument("--shots", type=int, default=4, help="support examples (default: 4)")
    show.add_argument("--query-size", type=int, default=2, help="query examples (default: 2)")
    show.add_argument("--episode", type=int, default=0, help="index of the episode in the seeded stream (default: 0)")
    show.add_argument("--model", default="smollm2-135m", help="base model whose tokenizer encodes the episode (default: smollm2-135m)")
    show.add_argument("--max-length", type=int, default=256, help="longest row in tokens (default: 256)")
    show.add_argument("--in-context", action="store_true", help="put the support examples in the query prompts (ICL baseline)")
    show.add_argument("--balanced", action="store_true", help="class-balanced support and query for multiple-choice tasks")
    show.set_defaults(func=_show)
    parser.set_defaults(func=lambda args: parser.print_help() or 0)


def _load(args: argparse.Namespace):
    from deltameta.tasks import load_tasks

    if args.builtin_tasks_per_family < 1:
        raise ConfigError(f"--builtin-tasks-per-family must be >= 1, got {args.builtin_tasks_per_family}.")
    return load_tasks(
        args.source,
        columns=args.columns,
        template=args.template,
        builtin_tasks_per_family=args.builtin_tasks_per_family,
        seed=args.seed,
    )


def _list(args: argparse.Namespace) -> int:
    from deltameta.tasks import split_collection, task_split_names

    collection = _load(args)
    split_of = task_split_names(split_collection(collection, args.splits, args.seed)) if args.splits else {}
    width = max([len("task")] + [len(t.name) for t in collection])
    family_width = max([len("family")] + [len(t.family) for t in collection])
    print(f"{'task':<{width}}  {'family':<{family_width}}  {'#examples':>9}  {'#options':>8}  split")
    for task in collection:
        options = task.num_options
        print(
            f"{task.name:<{width}}  {task.family:<{family_width}}  {len(task):>9}  "
            f"{options if options is not None else '-':>8}  {split_of.get(task.name, '-')}"
        )
    summary = f"{len(collection)} tasks, {len(collection.families)} families"
    if args.splits:
        counts: dict[str, int] = {}
        for name in split_of.values():
            counts[name] = counts.get(name, 0) + 1
        summary += "; " + ", ".join(f"{name}: {count}" for name, count in counts.items())
        unassigned = len(collection) - len(split_of)
        if unassigned:
            summary += f", no split: {unassigned}"
    print(summary)
    return 0


def _show(args: argparse.Namespace) -> int:
    from deltameta.base import load_base
    from deltameta.tasks import EpisodeSampler, TaskCollection, encode_episode, render_row

    collection = _load(args)
    task = collection[args.task]
    if args.episode < 0:
        raise ConfigError(f"--episode must be >= 0, got {args.episode}.")
    sampler = EpisodeSampler(TaskCollection([task]), args.shots, args.query_size, seed=args.seed, balanced=args.balanced)
    episode = sampler.episode(args.episode)
    _, tokenizer = load_base(args.model, quantization="none", device="cpu")
    support, query = encode_episode(tokenizer, episode, max_length=args.max_length, in_context=args.in_context)
    kind = f"multiple choice ({task.num_options} options)" if task.is_multiple_choice else "free-form"
    print(f"task {task.name} (family {task.family}, {len(task)} examples, {kind}) from {task.source}")
    if task.description:
        print(f"description: {task.description}")
    print(f"episode {args.episode} (seed {args.seed}), model {args.model}; loss is taken on [[...]] only")
    sections = [("query (support in the prompt)" if args.in_context else "query", query)]
    if support is not None and not args.in_context:
        sections.insert(0, ("support", support))
    for title, batch in sections:
        rows = batch["input_ids"].shape[0]
        print(f"\n=== {title}: {rows} row(s) ===")
        for row in range(rows):
            tokens = int(batch["attention_mask"][row].sum())
            scored = int((batch["labels"][row] != -100).sum())
            print(f"--- row {row} ({tokens} tokens, {scored} in the loss) ---")
            print(render_row(tokenizer, batch["input_ids"][row], batch["labels"][row], batch["attention_mask"][row]))
    return 0
