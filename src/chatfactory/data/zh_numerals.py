"""Chinese numerals: write a number as Chinese prose does (七, 十五, 一百零二) and read one back.

The bilingual tasks (data/tasks_zh.py) ask 「七加八等于多少？」 and accept 「十五」 or 「15」 as the answer;
the rubric (data/rubric.py) reads every number of a reply, in Arabic digits or in Chinese numerals,
with ``numbers``. Numerals run up to 亿 (10^8); 两 counts as 2, 〇 as 零; a run of bare digits with no
unit (一二三) reads digit by digit, as a year or a room number is read.

    from chatfactory.data.zh_numerals import zh_numeral, parse_zh, numbers
    zh_numeral(15), parse_zh("一百零二"), numbers("七加八等于十五。")   # '十五', 102, ['7', '8', '15']
"""

from __future__ import annotations

import re

DIGITS = {"零": 0, "〇": 0, "一": 1, "二": 2, "两": 2, "三": 3, "四": 4, "五": 5, "六": 6, "七": 7, "八": 8, "九": 9}
UNITS = {"十": 10, "百": 100, "千": 1000}
SECTIONS = {"万": 10**4, "亿": 10**8}
WRITE = "零一二三四五六七八九"
# a number in a reply: Arabic digits (a minus sign kept), or a run of Chinese numeral characters
NUMBER = re.compile(r"-?\d+|[" + "".join(DIGITS) + "".join(UNITS) + "".join(SECTIONS) + "]+")


def zh_numeral(n: int) -> str:
    """0 <= n < 10000 as written in prose: 0 零, 10 十, 15 十五, 20 二十, 102 一百零二, 110 一百一十, 2000 两千."""
    if not 0 <= n < 10000:
        raise ValueError(f"zh_numeral: {n} is outside 0..9999")
    if n < 10:
        return WRITE[n]
    if n < 20:  # 十五, not 一十五: the leading 一 is dropped before 十 alone
        return "十" + (WRITE[n % 10] if n % 10 else "")
    out, zero = "", False
    for value, unit in ((1000, "千"), (100, "百"), (10, "十"), (1, "")):
        d = n // value % 10
        if d:
            if zero and out:
                out += "零"  # one 零 stands for any run of missing places: 一千零五
            out += ("两" if d == 2 and unit == "千" else WRITE[d]) + unit
            zero = False
        else:
            zero = True
    return out


def parse_zh(text: str) -> int:
    """A run of Chinese numeral characters as an int: 十五 15, 二十 20, 一百零二 102, 两千 2000, 三万零五 30005."""
    if not text or any(ch not in DIGITS and ch not in UNITS and ch not in SECTIONS for ch in text):
        raise ValueError(f"parse_zh: {text!r} is not a Chinese numeral")
    if len(text) > 1 and all(ch in DIGITS for ch in text):
        return int("".join(str(DIGITS[ch]) for ch in text))  # 一二三: read digit by digit
    total = section = digit = 0
    for ch in text:
        if ch in DIGITS:
            digit = DIGITS[ch]
        elif ch in UNITS:
            section += (digit or 1) * UNITS[ch]  # 十五: a unit with no digit before it counts one
            digit = 0
        else:
            total += (section + digit or 1) * SECTIONS[ch]
            section = digit = 0
    return total + section + digit


def numbers(text: str) -> list[str]:
    """Every number in ``text`` in order, as Arabic digits ("15"), whether written 15 or 十五."""
    out = []
    for m in NUMBER.findall(text):
        out.append(str(int(m)) if m[-1].isdigit() else str(parse_zh(m)))
    return out
