"""Write a student copy of sagan: the whole project, runnable, with the exercises' code blanked.

    python course/make_copy.py --out ~/sagan-student                  # every exercise
    python course/make_copy.py --out DIR --exercises attention_map,d_hinge_loss
    python course/make_copy.py --list                                 # the exercises

The copy holds the project's files (PROJECT_FILES), each chosen exercise's code replaced by one
line, raise NotImplementedError("exercise NAME: what to write; check: the command"), plus
ASSIGNMENT.md (the exercises, their checks, time budgets and written questions, from
course/exercises.py and course/assignment.md). Its conftest.py is the project's with the kit's
pytest hooks (course/student_conftest.py) after it: they report a test stopped by the blank of an
exercise it does not check as skipped, naming that exercise. Nothing of course/ is copied: the
answer key (course/answers.md) and the reference code stay with the instructor, whose copy is the
repository itself. Every other file that holds no blank is copied byte for byte, so a copy without
blanks is the tested project.
"""

import argparse
import ast
import os
import shutil
import sys

from exercises import BY_NAME, EXERCISES, check_command

COURSE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(COURSE)
# What a student gets: every file of the project but the teaching kit (a test checks that every
# top-level module and document is here, so that a new one is not forgotten).
PROJECT_FILES = (".ci/gpu-check", ".ci/run", ".gitignore", "LICENSE", "README.md", "RESULTS.md", "benchmark.py",
                 "conftest.py", "curves.png", "data.py", "evaluate.py", "experiments.py", "measures.py", "pytest.ini",
                 "requirements.txt", "runs.py", "sagan.py", "samples.png", "samples3d.png", "test_runs.py",
                 "test_sagan.py", "test_tools.py", "train.py")
KIT_HOOKS = "\n\n# --- The teaching kit's hooks (course/student_conftest.py) ---\n\n"


class UserError(Exception):
    """A mistake on the command line: one line, exit 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with a malformed command line one line and exit 2, as every command of the project."""

    def error(self, message):
        raise UserError(f"{message} (see --help)")


# --- Finding a blank's lines ---------------------------------------------------------------------

def find_function(tree, qualname):
    """The FunctionDef named by a qualified name such as "SelfAttention.forward"."""
    node = tree
    for part in qualname.split("."):
        found = [n for n in node.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part]
        if not found:
            raise LookupError(f"no {qualname}")
        node = found[0]
    if not isinstance(node, ast.FunctionDef):
        raise LookupError(f"{qualname} is not a function")
    return node


def blocks(node):
    """Every statement list inside a function: each block, then the blocks nested in its statements."""
    for name in ("body", "orelse", "finalbody"):
        block = getattr(node, name, None)
        if block and isinstance(block[0], ast.stmt):
            yield block
            for stmt in block:
                if not isinstance(stmt, (ast.FunctionDef, ast.ClassDef)):
                    yield from blocks(stmt)
    for handler in getattr(node, "handlers", []):
        yield from blocks(handler)


def blank_span(source, tree, blank):
    """(first, last) 1-based lines that blank covers, and its indentation: from the statement that
    starts with blank.start (or the first after the docstring), widened up over the comment lines
    directly above it, to the one that starts with blank.stop (or the end of its block)."""
    fn = find_function(tree, blank.function)
    lines = source.splitlines()

    def starts(stmt, prefix):
        return lines[stmt.lineno - 1].strip().startswith(prefix)

    if blank.start:
        found = [(b, i) for b in blocks(fn) for i, s in enumerate(b) if starts(s, blank.start)]
        if len(found) != 1:
            raise LookupError(f"{len(found)} statements start with {blank.start!r} in {blank.function}; "
                              f"a blank names exactly one")
        block, i = found[0]
    else:
        block = fn.body
        has_doc = isinstance(block[0], ast.Expr) and isinstance(block[0].value, ast.Constant) \
            and isinstance(block[0].value.value, str)
        i = 1 if has_doc else 0
        if i == len(block):
            raise LookupError(f"{blank.function} has no body to blank")
    j = len(block) - 1
    if blank.stop:
        j = next((k for k in range(i, len(block)) if starts(block[k], blank.stop)), None)
        if j is None:
            raise LookupError(f"no statement starting with {blank.stop!r} after {blank.start!r} in {blank.function}")
    first, last = block[i].lineno, block[j].end_lineno
    while lines[first - 2].strip().startswith("#"):  # the comments that explain the first statement
        first -= 1
    indent = lines[block[i].lineno - 1][:block[i].col_offset]
    return first, last, indent


def blank_message(exercise, blank):
    return f"exercise {exercise.name}: {blank.todo}; check: {check_command(exercise.name)}"


def blank_source(source, blanks, path="<source>"):
    """The source with each (exercise, blank) replaced by its raise line."""
    tree = ast.parse(source)
    spans = sorted((blank_span(source, tree, b) + (blank_message(e, b),) for e, b in blanks), reverse=True)
    lines = source.splitlines(keepends=True)
    for (first, last, indent, message), below in zip(spans, [None] + spans):
        if below is not None and last >= below[0]:
            raise LookupError(f"two blanks overlap in {path} at line {below[0]}")
        lines[first - 1:last] = [f"{indent}raise NotImplementedError({message!r})\n"]
    out = "".join(lines)
    ast.parse(out, path)  # a blank must leave valid Python
    return out


# --- The copy -------------------------------------------------------------------------------------

def choose(names):
    """Exercises from a comma-separated list, or all of them for None."""
    if names is None:
        return list(EXERCISES)
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in BY_NAME]
    if unknown or not wanted:
        raise UserError(f"unknown exercise {', '.join(map(repr, unknown)) or '(none given)'}; "
                        f"choose from {', '.join(BY_NAME)}")
    return [e for e in EXERCISES if e.name in wanted]  # in the sheet's order


def assignment_sheet(chosen):
    """ASSIGNMENT.md: course/assignment.md with the table and a section per chosen exercise."""
    rows, sections, chosen_names = [], [], {e.name for e in chosen}
    numbers, n = {}, 0
    for e in EXERCISES:  # questions keep their numbers whatever is chosen: answers.md uses them
        numbers[e.name], n = range(n + 1, n + 1 + len(e.questions)), n + len(e.questions)
    for k, e in enumerate(chosen, 1):
        places = ", ".join(f"`{b.file}`: `{b.function}`" for b in e.blanks) or "no blank: run the code you wrote"
        rows.append(f"| {k} | `{e.name}` | {e.title} | {e.paper} | `{check_command(e.name)}` | {e.budget} |")
        needs = [n for n in e.needs if n in chosen_names]  # the others are not blank in this copy
        text = [f"## {k}. {e.title} (`{e.name}`)", "",
                f"**Paper**: {e.paper}. **Where**: {places}.", "", e.task, "",
                f"**Check**: `{check_command(e.name)}`" + (f" (it runs through your code for {', '.join(needs)}: "
                                                            f"finish {'those' if len(needs) > 1 else 'that'} first)"
                                                            if needs else ""), "",
                f"**Time budget**: {e.budget}.", "", "**Written questions**", ""]
        text += [f"{q}. {question}" for q, question in zip(numbers[e.name], e.questions)]
        sections.append("\n".join(text))
    table = "\n".join(["| # | exercise | what | paper | check | time |", "|---|---|---|---|---|---|"] + rows)
    with open(os.path.join(COURSE, "assignment.md")) as f:
        template = f.read()
    return template.replace("<!-- exercise table -->", table).replace("<!-- exercises -->", "\n\n".join(sections))


def make_copy(out, chosen, root=ROOT):
    """Write the student copy of the project at `root` into the new or empty folder `out`, whole
    or not at all: it is made in OUT.partial<pid> beside it and renamed into place when complete,
    and a partial copy of a process that died is removed. Returns the number of blanks."""
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise UserError(f"--out {out} exists and is not an empty folder")
    parent, name = os.path.split(os.path.abspath(out))
    for entry in os.listdir(parent):  # the partial copies of processes that died
        pid = entry[len(name) + len(".partial"):] if entry.startswith(name + ".partial") else ""
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    partial = os.path.join(parent, f"{name}.partial{os.getpid()}")
    try:
        n = write_copy(partial, chosen, root)
        os.replace(partial, out)  # onto an empty folder, or none
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return n


def write_copy(out, chosen, root):
    missing = [name for name in PROJECT_FILES if not os.path.isfile(os.path.join(root, name))]
    if missing:
        raise UserError(f"{root} lacks {', '.join(missing)}: not a whole sagan checkout")
    by_file = {}
    for e in chosen:
        for b in e.blanks:
            by_file.setdefault(b.file, []).append((e, b))
    sources = {}
    for name, blanks in by_file.items():  # all blanks first, so that a failure writes nothing
        with open(os.path.join(root, name)) as f:
            sources[name] = blank_source(f.read(), blanks, name)
    for name in PROJECT_FILES:
        dest = os.path.join(out, name)
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.copy2(os.path.join(root, name), dest)  # keeps the scripts' execute bits
        if name in sources:
            with open(dest, "w") as f:
                f.write(sources[name])
    with open(os.path.join(COURSE, "student_conftest.py")) as f, open(os.path.join(out, "conftest.py"), "a") as conftest:
        conftest.write(KIT_HOOKS + f.read())
    with open(os.path.join(out, "ASSIGNMENT.md"), "w") as f:
        f.write(assignment_sheet(chosen))
    return sum(len(b) for b in by_file.values())


def main(argv=None):
    p = ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    p.add_argument("--out", help="the student copy's folder (new, or empty)")
    p.add_argument("--exercises", help=f"comma-separated, default all: {','.join(BY_NAME)}")
    p.add_argument("--list", action="store_true", help="list the exercises and exit")
    try:
        args = p.parse_args(argv)
        if args.list:
            for e in EXERCISES:
                print(f"{e.name:18} {e.title} ({e.paper})")
            return 0
        if not args.out:
            raise UserError("--out DIR is required: the folder for the student copy")
        chosen = choose(args.exercises)
        n = make_copy(args.out, chosen)
    except (UserError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (LookupError, SyntaxError) as e:  # the exercise list no longer fits the code
        print(f"error: course/exercises.py: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: no copy was written", file=sys.stderr)
        return 130
    print(f"wrote a student copy to {args.out}: {n} blanks in {len(chosen)} exercises "
          f"({', '.join(e.name for e in chosen)}); the sheet is {os.path.join(args.out, 'ASSIGNMENT.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
