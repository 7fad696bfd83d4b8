"""Builds python-docstrings.txt from the docstrings of the running Python standard library.

python data/demo/make_corpus.py > data/demo/python-docstrings.txt
"""

import importlib
import inspect
import sys

MODULES = """collections itertools functools json csv pathlib os re string textwrap datetime calendar
random statistics math decimal fractions heapq bisect queue threading subprocess socket http.client
urllib.parse email.message logging argparse unittest doctest difflib shutil tempfile zipfile tarfile
gzip hashlib hmac secrets uuid sqlite3 xml.etree.ElementTree html.parser asyncio contextlib
dataclasses enum typing abc io pickle copy pprint traceback warnings weakref inspect ast dis tokenize
struct array codecs locale gettext time sched selectors signal mmap ipaddress smtplib ftplib imaplib
poplib base64 binascii zlib bz2 lzma configparser fileinput glob fnmatch linecache shelve dbm
operator numbers cmath turtle tkinter wave colorsys optparse getopt platform sysconfig site venv
zipapp timeit trace tracemalloc gc builtins""".split()
LIMIT = 600_000  # characters: enough for a tiny model to learn words, quick to tokenize


def main() -> None:
    seen: set[str] = set()
    docs: list[str] = []

    def add(doc: str | None) -> None:
        doc = inspect.cleandoc(doc).strip() if doc else ""
        if len(doc) >= 80 and doc not in seen:  # skip one-liners: too little prose
            seen.add(doc)
            docs.append(doc)

    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        add(module.__doc__)
        for attr, obj in sorted(vars(module).items()):
            if attr.startswith("_") or getattr(obj, "__module__", None) != module.__name__:
                continue
            add(getattr(obj, "__doc__", None))
            if inspect.isclass(obj):
                for member_name, member in sorted(vars(obj).items()):
                    if not member_name.startswith("_"):
                        add(getattr(member, "__doc__", None))
    sys.stdout.write("\n\n".join(docs)[:LIMIT])


if __name__ == "__main__":
    main()
