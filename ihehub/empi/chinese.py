"""Chinese names and resident identity numbers.

* Names keep their hanzi; pinyin (full and initials, toneless, ü written ``v``) comes from pypinyin, but the
  surname is read from `SURNAME_PINYIN` first: pypinyin reads a surname character like any other word and
  gets the heteronyms wrong (单 dan for Shàn, 曾 ceng for Zēng, 解 jie for Xiè, 仇 chou for Qiú, 区 qu for
  Ōu, 朴 pu for Piáo, 查 cha for Zhā, ...).  The readings follow 《百家姓》 and the 通用规范汉字表
  surname readings; every entry whose pypinyin reading differs is checked by ``tests/empi``.
* A whole name in one field ("欧阳娜娜") is split after the longest known surname (`COMPOUND_SURNAMES`).
* Resident identity numbers (公民身份号码, GB 11643-1999) are checked with ``stdnum.cn.ric``: length,
  ISO 7064 MOD 11-2 check digit, the birth date in digits 7–14 and the sex in digit 17 (odd = male).
  A 15-digit first-generation number is widened to 18 digits (century 19, check digit computed).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import re
import unicodedata
from types import MappingProxyType

from pypinyin import Style, lazy_pinyin
from stdnum import numdb
from stdnum.cn import ric as stdnum_ric
from stdnum.exceptions import ValidationError

from ihehub.empi.errors import InvalidData

HANZI = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0003134f]")

# Compound surnames (复姓) first: a whole name is split after the longest surname it starts with.
COMPOUND_SURNAMES = MappingProxyType(
    {
        "欧阳": "ouyang", "司马": "sima", "上官": "shangguan", "诸葛": "zhuge", "东方": "dongfang",
        "皇甫": "huangfu", "尉迟": "yuchi", "公孙": "gongsun", "慕容": "murong", "长孙": "zhangsun",
        "宇文": "yuwen", "司徒": "situ", "司空": "sikong", "夏侯": "xiahou", "轩辕": "xuanyuan",
        "令狐": "linghu", "端木": "duanmu", "澹台": "tantai", "南宫": "nangong", "西门": "ximen",
        "申屠": "shentu", "呼延": "huyan", "独孤": "dugu", "钟离": "zhongli", "闻人": "wenren",
        "赫连": "helian", "万俟": "moqi", "单于": "chanyu", "太史": "taishi", "公冶": "gongye",
        "濮阳": "puyang", "淳于": "chunyu", "百里": "baili", "东郭": "dongguo", "亓官": "qiguan",
        "拓跋": "tuoba", "第五": "diwu", "左丘": "zuoqiu", "乐正": "yuezheng", "梁丘": "liangqiu",
        "巫马": "wuma", "公羊": "gongyang", "仲孙": "zhongsun", "叔孙": "shusun", "鲜于": "xianyu",
        "闾丘": "lvqiu", "谷梁": "guliang", "宰父": "zaifu", "段干": "duangan", "漆雕": "qidiao",
    }
)

# Single-character surnames whose surname reading is not the one pypinyin picks for the character alone
# (or that pypinyin changes with the next character, as in 曾经, 单于, 解放).
SURNAME_PINYIN = MappingProxyType(
    {
        "单": "shan", "曾": "zeng", "解": "xie", "仇": "qiu", "区": "ou", "朴": "piao", "查": "zha",
        "盖": "ge", "缪": "miao", "翟": "zhai", "覃": "qin", "秘": "bi", "召": "shao", "折": "she",
        "种": "chong", "员": "yun", "繁": "po", "句": "gou", "阚": "kan", "佴": "nai", "隗": "wei",
        "薄": "bo", "卜": "bu", "么": "yao", "藏": "zang", "能": "nai", "都": "du", "角": "jue",
        "重": "chong", "祭": "zhai", "乜": "nie", "洗": "xian", "颉": "xie", "乐": "yue", "尉": "wei",
        "长": "chang", "沈": "shen", "燕": "yan", "华": "hua", "纪": "ji", "柏": "bai", "任": "ren",
        "曲": "qu", "殷": "yin", "车": "che", "贾": "jia", "宿": "su", "俞": "yu", "朝": "chao",
        "晁": "chao", "莘": "shen", "隽": "juan", "蕃": "pi", "黑": "hei", "宓": "mi", "逄": "pang",
        "冼": "xian", "眭": "sui", "那": "na", "瞿": "qu", "费": "fei", "叶": "ye", "牟": "mou",
        "褚": "chu", "石": "shi", "于": "yu", "盛": "sheng", "应": "ying", "陆": "lu", "过": "guo",
        "谌": "chen", "汤": "tang", "和": "he", "奇": "qi", "粘": "nian", "郇": "huan",
        "厍": "she", "钭": "tou", "訾": "zi", "缑": "gou", "訇": "hong", "亓": "qi",
        "咸": "xian",
    }
)


@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ChineseName:
    """A name split into surname and given name, in hanzi and pinyin."""

    family: str
    given: str
    family_pinyin: str  # "ouyang"
    given_pinyin: tuple[str, ...]  # ("na", "na")

    @property
    def initials(self) -> str:
        return "".join(s[:1] for s in (*self.family_pinyin.split(), *self.given_pinyin))


def has_hanzi(text: str) -> bool:
    return bool(HANZI.search(text))


def clean_hanzi(text: str) -> str:
    """NFKC (full-width forms), no spaces, no middle dots of transliterated minority names (阿卜杜·热合曼)."""
    text = unicodedata.normalize("NFKC", text)
    return re.sub(r"[\s·・•.\-]+", "", text)


def split_surname(full: str) -> tuple[str, str]:
    """``"欧阳娜娜"`` -> ``("欧阳", "娜娜")``; ``"张三"`` -> ``("张", "三")``."""
    full = clean_hanzi(full)
    if len(full) >= 3 and full[:2] in COMPOUND_SURNAMES:
        return full[:2], full[2:]
    if len(full) <= 1:
        return full, ""
    return full[:1], full[1:]


def surname_pinyin(surname: str) -> str:
    """The pinyin of a surname, read from the surname tables before pypinyin."""
    if surname in COMPOUND_SURNAMES:
        return COMPOUND_SURNAMES[surname]
    parts = []
    for ch in surname:
        parts.append(SURNAME_PINYIN.get(ch) or "".join(_pinyin(ch)))
    return "".join(parts)


def given_pinyin(given: str) -> tuple[str, ...]:
    return tuple(_pinyin(given))


def _pinyin(text: str) -> list[str]:
    out = []
    for syl in lazy_pinyin(text, style=Style.NORMAL, errors="default"):
        syl = re.sub(r"[^a-z]", "", syl.lower().replace("ü", "v"))
        if syl:
            out.append(syl)
    return out


def chinese_name(family: str, given: str = "") -> ChineseName:
    """Normalise a Chinese name: split a whole name, read the surname from the override tables."""
    family, given = clean_hanzi(family), clean_hanzi(given)
    if not given:
        family, given = split_surname(family)
    return ChineseName(family=family, given=given, family_pinyin=surname_pinyin(family),
                       given_pinyin=given_pinyin(given))


# -- resident identity number (GB 11643-1999) ----------------------------------------------------

@dataclasses.dataclass(frozen=True, kw_only=True, slots=True)
class ResidentId:
    """A checked resident identity number with what it tells: birth date, sex, region of registration."""

    number: str  # 18 characters, upper-case X
    birth_date: dt.date
    sex: str  # "M" or "F"
    region: str  # the 6-digit administrative division code
    region_known: bool  # the code is in stdnum's division table (older and newer codes may be absent)


def parse_resident_id(value: str, *, field: str = "national_id") -> ResidentId:
    """Check a resident identity number and derive its birth date and sex; `InvalidData` names ``field``."""
    number = stdnum_ric.compact(value)
    if len(number) == 15 and number.isdigit():
        body = number[:6] + "19" + number[6:]
        number = body + stdnum_ric.calc_check_digit(body + "0")
    if len(number) != 18:
        raise InvalidData(f"resident ID {value!r} has {len(number)} characters, not 18", field=field)
    if not number[:17].isdigit() or not (number[17].isdigit() or number[17] == "X"):
        raise InvalidData(f"resident ID {value!r} is not 17 digits and a check character", field=field)
    if number[17] != stdnum_ric.calc_check_digit(number):
        raise InvalidData(f"resident ID {value!r} fails its check digit (expected "
                          f"{stdnum_ric.calc_check_digit(number)})", field=field)
    try:
        birth = stdnum_ric.get_birth_date(number)
    except ValidationError:
        raise InvalidData(f"resident ID {value!r} holds no valid birth date ({number[6:14]})", field=field) from None
    if birth > dt.date.today() or birth.year < 1870:
        raise InvalidData(f"resident ID {value!r} holds an impossible birth date {birth.isoformat()}", field=field)
    region = number[:6]
    return ResidentId(number=number, birth_date=birth, sex="M" if int(number[16]) % 2 else "F",
                      region=region, region_known=_region_known(region))


@functools.lru_cache(maxsize=8192)
def _region_known(region: str) -> bool:
    """Whether stdnum's division table has the county ``region`` (a slow lookup: a few thousand codes exist)."""
    return any("county" in props for _part, props in numdb.get("cn/loc").info(region))
