"""How a message names a domain: once, in one form, decided here.

Errors raised by code that works on one domain (libvirt calls, the planner, the write
path) already name it, as `domain 'NAME'` or `domain 'NAME' (UUID)`; code holding the
domain that reports such an error must not add the name again (a log line once read
`domain 'web1': domain 6bdb…: lookup failed`). `about_domain` is what every holder
uses: it adds `domain 'NAME': ` only to a message that does not name the domain, and
turns a bare-UUID naming into the name. `for_row` is the same for output that already
shows the name in its own column or prefix (`NAME: message`).
"""

from __future__ import annotations


def domain_label(name: str) -> str:
    return f"domain '{name}'"


def _renamed(name: str, uuid: str | None, text: str) -> str:
    if uuid:
        bare = f"domain {uuid}"
        if bare in text and domain_label(name) not in text:
            return text.replace(bare, domain_label(name), 1)
    return text


def names_domain(name: str, text: str) -> bool:
    """Whether `text` already names the domain."""
    return domain_label(name) in text


def about_domain(name: str, message: str | BaseException, uuid: str | None = None) -> str:
    """`message` naming the domain exactly once (module rules)."""
    text = _renamed(name, uuid, str(message))
    return text if names_domain(name, text) else f"{domain_label(name)}: {text}"


def for_row(name: str, message: str | BaseException, uuid: str | None = None) -> str:
    """`message` for a place that shows the name itself: a leading `domain 'NAME': ` (or
    `domain 'NAME' (UUID): `) is dropped, since the row or prefix names the domain."""
    text = _renamed(name, uuid, str(message))
    for head in ([f"{domain_label(name)} ({uuid}): "] if uuid else []) + [f"{domain_label(name)}: "]:
        if text.startswith(head):
            return text[len(head):]
    return text


def line(name: str, message: str | BaseException, uuid: str | None = None) -> str:
    """`NAME: message` for line-by-line output, naming the domain once: a message that
    names it in the middle of a sentence is printed as it is."""
    text = for_row(name, message, uuid)
    return text if names_domain(name, text) else f"{name}: {text}"
