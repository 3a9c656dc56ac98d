"""Polyglot: a small, parallel, multilingual instruction set generated from hand-written templates.

Every item is sampled once (numbers, people, objects, countries ...) and then rendered in each
language, so rows sharing an ``id`` say the same thing.  That makes the set usable both for
instruction tuning (answers are short, verifiable and in the instruction's language) and as
English/target parallel pairs for contrastive alignment.

Counts in the word problems are always >= 2 and the amounts added or removed stay in 2..10, so
the plural tables below only ever need the forms that actually occur (Russian still needs three
forms because of 21, 22, 25 ...).  Swahili puts digits after the noun, which sidesteps numeral
agreement; only the ``-ngapi`` ("how many") and ``-ingine`` ("other") concords are tabulated.

CLI: ``python -m data.polyglot --items N --out DIR`` writes ``DIR/polyglot.jsonl`` and
``DIR/pairs.jsonl``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LANGUAGES: tuple[str, ...] = ("en", "fr", "de", "es", "zh", "sw", "ru")

# --------------------------------------------------------------------------------------------
# Vocabulary tables
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Person:
    """A named person; ``gender`` drives pronouns (sw and es need none)."""

    gender: str  # "f" or "m"
    names: dict[str, str]
    ru_genitive: str  # "У Анны ..." needs the genitive


PEOPLE: tuple[Person, ...] = (
    Person("f", {"en": "Anna", "fr": "Anna", "de": "Anna", "es": "Ana", "zh": "安娜",
                 "sw": "Anna", "ru": "Анна"}, "Анны"),
    Person("f", {"en": "Maria", "fr": "Marie", "de": "Maria", "es": "María", "zh": "玛丽亚",
                 "sw": "Maria", "ru": "Мария"}, "Марии"),
    Person("f", {"en": "Sarah", "fr": "Sarah", "de": "Sarah", "es": "Sara", "zh": "莎拉",
                 "sw": "Sara", "ru": "Сара"}, "Сары"),
    Person("f", {"en": "Amina", "fr": "Amina", "de": "Amina", "es": "Amina", "zh": "阿米娜",
                 "sw": "Amina", "ru": "Амина"}, "Амины"),
    Person("f", {"en": "Elena", "fr": "Hélène", "de": "Elena", "es": "Elena", "zh": "埃琳娜",
                 "sw": "Elena", "ru": "Елена"}, "Елены"),
    Person("m", {"en": "David", "fr": "David", "de": "David", "es": "David", "zh": "大卫",
                 "sw": "Daudi", "ru": "Давид"}, "Давида"),
    Person("m", {"en": "Peter", "fr": "Pierre", "de": "Peter", "es": "Pedro", "zh": "彼得",
                 "sw": "Petro", "ru": "Пётр"}, "Петра"),
    Person("m", {"en": "Thomas", "fr": "Thomas", "de": "Thomas", "es": "Tomás", "zh": "托马斯",
                 "sw": "Tomaso", "ru": "Томас"}, "Томаса"),
    Person("m", {"en": "Omar", "fr": "Omar", "de": "Omar", "es": "Omar", "zh": "奥马尔",
                 "sw": "Omari", "ru": "Омар"}, "Омара"),
    Person("m", {"en": "Paul", "fr": "Paul", "de": "Paul", "es": "Pablo", "zh": "保罗",
                 "sw": "Paulo", "ru": "Павел"}, "Павла"),
)  # fmt: skip

# Subject pronouns, sentence-initial.  es and sw drop the pronoun; zh writes it always.
PRONOUNS: dict[str, dict[str, str]] = {
    "en": {"f": "She", "m": "He"},
    "fr": {"f": "Elle", "m": "Il"},
    "de": {"f": "Sie", "m": "Er"},
    "zh": {"f": "她", "m": "他"},
    "ru": {"f": "Она", "m": "Он"},
}


@dataclass(frozen=True)
class CountNoun:
    """A countable object with every form the word-problem templates need, per language.

    en/de: plural.  fr: plural and the ``combien de`` form (elision).  es: plural and gender
    (``cuántos``/``cuántas``).  zh: noun and classifier.  sw: plural noun and its ``-ngapi`` and
    ``-ingine`` concords.  ru: nominative singular, genitive singular, genitive plural.
    """

    en: str
    fr: tuple[str, str]
    de: str
    es: tuple[str, str]
    zh: tuple[str, str]
    sw: tuple[str, str, str]
    ru: tuple[str, str, str]


OBJECTS: tuple[CountNoun, ...] = (
    CountNoun("oranges", ("oranges", "d'oranges"), "Orangen", ("naranjas", "f"),
              ("橙子", "个"), ("machungwa", "mangapi", "mengine"),
              ("апельсин", "апельсина", "апельсинов")),
    CountNoun("books", ("livres", "de livres"), "Bücher", ("libros", "m"),
              ("书", "本"), ("vitabu", "vingapi", "vingine"),
              ("книга", "книги", "книг")),
    CountNoun("pens", ("stylos", "de stylos"), "Stifte", ("bolígrafos", "m"),
              ("笔", "支"), ("kalamu", "ngapi", "nyingine"),
              ("ручка", "ручки", "ручек")),
    CountNoun("balls", ("ballons", "de ballons"), "Bälle", ("pelotas", "f"),
              ("球", "个"), ("mipira", "mingapi", "mingine"),
              ("мяч", "мяча", "мячей")),
    CountNoun("eggs", ("œufs", "d'œufs"), "Eier", ("huevos", "m"),
              ("鸡蛋", "个"), ("mayai", "mangapi", "mengine"),
              ("яйцо", "яйца", "яиц")),
    CountNoun("bananas", ("bananes", "de bananes"), "Bananen", ("plátanos", "m"),
              ("香蕉", "根"), ("ndizi", "ngapi", "nyingine"),
              ("банан", "банана", "бананов")),
    CountNoun("cups", ("tasses", "de tasses"), "Tassen", ("tazas", "f"),
              ("杯子", "个"), ("vikombe", "vingapi", "vingine"),
              ("чашка", "чашки", "чашек")),
    CountNoun("chairs", ("chaises", "de chaises"), "Stühle", ("sillas", "f"),
              ("椅子", "把"), ("viti", "vingapi", "vingine"),
              ("стул", "стула", "стульев")),
)  # fmt: skip

# (country, capital) per language.  fr stores the country with its "de" form (du/de la/de l')
# and ru stores the genitive, because that is the only way the templates use them.
CAPITALS: tuple[dict[str, tuple[str, str]], ...] = (
    {"en": ("France", "Paris"), "fr": ("de la France", "Paris"), "de": ("Frankreich", "Paris"),
     "es": ("Francia", "París"), "zh": ("法国", "巴黎"), "sw": ("Ufaransa", "Paris"),
     "ru": ("Франции", "Париж")},
    {"en": ("Germany", "Berlin"), "fr": ("de l'Allemagne", "Berlin"),
     "de": ("Deutschland", "Berlin"), "es": ("Alemania", "Berlín"), "zh": ("德国", "柏林"),
     "sw": ("Ujerumani", "Berlin"), "ru": ("Германии", "Берлин")},
    {"en": ("Italy", "Rome"), "fr": ("de l'Italie", "Rome"), "de": ("Italien", "Rom"),
     "es": ("Italia", "Roma"), "zh": ("意大利", "罗马"), "sw": ("Italia", "Roma"),
     "ru": ("Италии", "Рим")},
    {"en": ("Spain", "Madrid"), "fr": ("de l'Espagne", "Madrid"), "de": ("Spanien", "Madrid"),
     "es": ("España", "Madrid"), "zh": ("西班牙", "马德里"), "sw": ("Hispania", "Madrid"),
     "ru": ("Испании", "Мадрид")},
    {"en": ("Japan", "Tokyo"), "fr": ("du Japon", "Tokyo"), "de": ("Japan", "Tokio"),
     "es": ("Japón", "Tokio"), "zh": ("日本", "东京"), "sw": ("Japani", "Tokyo"),
     "ru": ("Японии", "Токио")},
    {"en": ("China", "Beijing"), "fr": ("de la Chine", "Pékin"), "de": ("China", "Peking"),
     "es": ("China", "Pekín"), "zh": ("中国", "北京"), "sw": ("China", "Beijing"),
     "ru": ("Китая", "Пекин")},
    {"en": ("Kenya", "Nairobi"), "fr": ("du Kenya", "Nairobi"), "de": ("Kenia", "Nairobi"),
     "es": ("Kenia", "Nairobi"), "zh": ("肯尼亚", "内罗毕"), "sw": ("Kenya", "Nairobi"),
     "ru": ("Кении", "Найроби")},
    {"en": ("Egypt", "Cairo"), "fr": ("de l'Égypte", "Le Caire"), "de": ("Ägypten", "Kairo"),
     "es": ("Egipto", "El Cairo"), "zh": ("埃及", "开罗"), "sw": ("Misri", "Kairo"),
     "ru": ("Египта", "Каир")},
    {"en": ("Tanzania", "Dodoma"), "fr": ("de la Tanzanie", "Dodoma"),
     "de": ("Tansania", "Dodoma"), "es": ("Tanzania", "Dodoma"), "zh": ("坦桑尼亚", "多多马"),
     "sw": ("Tanzania", "Dodoma"), "ru": ("Танзании", "Додома")},
    {"en": ("Uganda", "Kampala"), "fr": ("de l'Ouganda", "Kampala"),
     "de": ("Uganda", "Kampala"), "es": ("Uganda", "Kampala"), "zh": ("乌干达", "坎帕拉"),
     "sw": ("Uganda", "Kampala"), "ru": ("Уганды", "Кампала")},
    {"en": ("Nigeria", "Abuja"), "fr": ("du Nigeria", "Abuja"), "de": ("Nigeria", "Abuja"),
     "es": ("Nigeria", "Abuya"), "zh": ("尼日利亚", "阿布贾"), "sw": ("Nigeria", "Abuja"),
     "ru": ("Нигерии", "Абуджа")},
    {"en": ("Ghana", "Accra"), "fr": ("du Ghana", "Accra"), "de": ("Ghana", "Accra"),
     "es": ("Ghana", "Acra"), "zh": ("加纳", "阿克拉"), "sw": ("Ghana", "Accra"),
     "ru": ("Ганы", "Аккра")},
    {"en": ("Russia", "Moscow"), "fr": ("de la Russie", "Moscou"), "de": ("Russland", "Moskau"),
     "es": ("Rusia", "Moscú"), "zh": ("俄罗斯", "莫斯科"), "sw": ("Urusi", "Moscow"),
     "ru": ("России", "Москва")},
    {"en": ("Canada", "Ottawa"), "fr": ("du Canada", "Ottawa"), "de": ("Kanada", "Ottawa"),
     "es": ("Canadá", "Ottawa"), "zh": ("加拿大", "渥太华"), "sw": ("Kanada", "Ottawa"),
     "ru": ("Канады", "Оттава")},
    {"en": ("India", "New Delhi"), "fr": ("de l'Inde", "New Delhi"),
     "de": ("Indien", "Neu-Delhi"), "es": ("la India", "Nueva Delhi"),
     "zh": ("印度", "新德里"), "sw": ("India", "New Delhi"), "ru": ("Индии", "Нью-Дели")},
    {"en": ("Rwanda", "Kigali"), "fr": ("du Rwanda", "Kigali"), "de": ("Ruanda", "Kigali"),
     "es": ("Ruanda", "Kigali"), "zh": ("卢旺达", "基加利"), "sw": ("Rwanda", "Kigali"),
     "ru": ("Руанды", "Кигали")},
    {"en": ("Ethiopia", "Addis Ababa"), "fr": ("de l'Éthiopie", "Addis-Abeba"),
     "de": ("Äthiopien", "Addis Abeba"), "es": ("Etiopía", "Adís Abeba"),
     "zh": ("埃塞俄比亚", "亚的斯亚贝巴"), "sw": ("Ethiopia", "Addis Ababa"),
     "ru": ("Эфиопии", "Аддис-Абеба")},
    {"en": ("Portugal", "Lisbon"), "fr": ("du Portugal", "Lisbonne"),
     "de": ("Portugal", "Lissabon"), "es": ("Portugal", "Lisboa"), "zh": ("葡萄牙", "里斯本"),
     "sw": ("Ureno", "Lisbon"), "ru": ("Португалии", "Лиссабон")},
    {"en": ("Greece", "Athens"), "fr": ("de la Grèce", "Athènes"),
     "de": ("Griechenland", "Athen"), "es": ("Grecia", "Atenas"), "zh": ("希腊", "雅典"),
     "sw": ("Ugiriki", "Athens"), "ru": ("Греции", "Афины")},
    {"en": ("Brazil", "Brasília"), "fr": ("du Brésil", "Brasília"),
     "de": ("Brasilien", "Brasília"), "es": ("Brasil", "Brasilia"), "zh": ("巴西", "巴西利亚"),
     "sw": ("Brazil", "Brasilia"), "ru": ("Бразилии", "Бразилиа")},
    {"en": ("Australia", "Canberra"), "fr": ("de l'Australie", "Canberra"),
     "de": ("Australien", "Canberra"), "es": ("Australia", "Canberra"),
     "zh": ("澳大利亚", "堪培拉"), "sw": ("Australia", "Canberra"), "ru": ("Австралии", "Канберра")},
)  # fmt: skip

# Monday first.  ru needs nominative, genitive (после ...) and instrumental (перед ...).
WEEKDAYS: dict[str, tuple[str, ...]] = {
    "en": ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"),
    "fr": ("lundi", "mardi", "mercredi", "jeudi", "vendredi", "samedi", "dimanche"),
    "de": ("Montag", "Dienstag", "Mittwoch", "Donnerstag", "Freitag", "Samstag", "Sonntag"),
    "es": ("lunes", "martes", "miércoles", "jueves", "viernes", "sábado", "domingo"),
    "zh": ("星期一", "星期二", "星期三", "星期四", "星期五", "星期六", "星期日"),
    "sw": ("Jumatatu", "Jumanne", "Jumatano", "Alhamisi", "Ijumaa", "Jumamosi", "Jumapili"),
    "ru": ("понедельник", "вторник", "среда", "четверг", "пятница", "суббота", "воскресенье"),
}
RU_WEEKDAYS_GENITIVE = (
    "понедельника", "вторника", "среды", "четверга", "пятницы", "субботы", "воскресенья",
)  # fmt: skip
RU_WEEKDAYS_INSTRUMENTAL = (
    "понедельником", "вторником", "средой", "четвергом", "пятницей", "субботой", "воскресеньем",
)  # fmt: skip

# (thing as used in the question, its colour agreeing with it) per language.  sw colours are
# what follows "rangi ... ni" (class 9 agreement: nyeupe, nyeusi, nyekundu).
COLOURS: tuple[dict[str, tuple[str, str]], ...] = (
    {"en": ("the sky", "blue"), "fr": ("le ciel", "bleu"), "de": ("der Himmel", "blau"),
     "es": ("el cielo", "azul"), "zh": ("天空", "蓝色"), "sw": ("anga", "bluu"),
     "ru": ("небо", "голубое")},
    {"en": ("grass", "green"), "fr": ("l'herbe", "verte"), "de": ("Gras", "grün"),
     "es": ("la hierba", "verde"), "zh": ("草", "绿色"), "sw": ("nyasi", "kijani"),
     "ru": ("трава", "зелёная")},
    {"en": ("snow", "white"), "fr": ("la neige", "blanche"), "de": ("Schnee", "weiß"),
     "es": ("la nieve", "blanca"), "zh": ("雪", "白色"), "sw": ("theluji", "nyeupe"),
     "ru": ("снег", "белый")},
    {"en": ("coal", "black"), "fr": ("le charbon", "noir"), "de": ("Kohle", "schwarz"),
     "es": ("el carbón", "negro"), "zh": ("煤", "黑色"), "sw": ("makaa ya mawe", "nyeusi"),
     "ru": ("уголь", "чёрный")},
    {"en": ("blood", "red"), "fr": ("le sang", "rouge"), "de": ("Blut", "rot"),
     "es": ("la sangre", "roja"), "zh": ("血", "红色"), "sw": ("damu", "nyekundu"),
     "ru": ("кровь", "красная")},
    {"en": ("a lemon", "yellow"), "fr": ("le citron", "jaune"), "de": ("eine Zitrone", "gelb"),
     "es": ("el limón", "amarillo"), "zh": ("柠檬", "黄色"), "sw": ("limau", "njano"),
     "ru": ("лимон", "жёлтый")},
    {"en": ("milk", "white"), "fr": ("le lait", "blanc"), "de": ("Milch", "weiß"),
     "es": ("la leche", "blanca"), "zh": ("牛奶", "白色"), "sw": ("maziwa", "nyeupe"),
     "ru": ("молоко", "белое")},
    {"en": ("a ripe tomato", "red"), "fr": ("une tomate mûre", "rouge"),
     "de": ("eine reife Tomate", "rot"), "es": ("un tomate maduro", "rojo"),
     "zh": ("熟透的番茄", "红色"), "sw": ("nyanya iliyoiva", "nyekundu"),
     "ru": ("спелый помидор", "красный")},
    {"en": ("a ripe banana", "yellow"), "fr": ("une banane mûre", "jaune"),
     "de": ("eine reife Banane", "gelb"), "es": ("un plátano maduro", "amarillo"),
     "zh": ("熟透的香蕉", "黄色"), "sw": ("ndizi mbivu", "njano"),
     "ru": ("спелый банан", "жёлтый")},
)  # fmt: skip

# --------------------------------------------------------------------------------------------
# Templates: family -> variant -> language -> (instruction, response)
# --------------------------------------------------------------------------------------------

Templates = dict[str, dict[str, tuple[str, str]]]

WORD_PROBLEM: Templates = {
    "gain": {
        "en": ("{name} has {a} {obj}. {Pron} buys {b} more {obj}. "
               "How many {obj} does {name} have now?", "{name} now has {c} {obj}."),
        "fr": ("{name} a {a} {obj}. {Pron} en achète {b} de plus. "
               "Combien {de_obj} {name} a-t-{pron} maintenant ?", "{name} a maintenant {c} {obj}."),
        "de": ("{name} hat {a} {obj}. {Pron} kauft noch {b} {obj} dazu. "
               "Wie viele {obj} hat {name} jetzt?", "{name} hat jetzt {c} {obj}."),
        "es": ("{name} tiene {a} {obj}. Compra {b} {obj} más. "
               "¿{Cuantos} {obj} tiene {name} ahora?", "Ahora {name} tiene {c} {obj}."),
        "zh": ("{name}有{a}{cl}{obj}。{Pron}又买了{b}{cl}。{name}现在有多少{cl}{obj}？",
               "{name}现在有{c}{cl}{obj}。"),
        "sw": ("{name} ana {obj} {a}. Ananunua {obj} {ingine} {b}. Sasa {name} ana {obj} {ngapi}?",
               "Sasa {name} ana {obj} {c}."),
        "ru": ("У {name_gen} {a} {obj_a}. {Pron} покупает ещё {b} {obj_b}. "
               "Сколько {obj_many} теперь у {name_gen}?", "Теперь у {name_gen} {c} {obj_c}."),
    },
    "loss": {
        "en": ("{name} has {a} {obj}. {Pron} gives {b} of them to a friend. "
               "How many {obj} does {name} have now?", "{name} now has {c} {obj}."),
        "fr": ("{name} a {a} {obj}. {Pron} en donne {b} à un ami. "
               "Combien {de_obj} {name} a-t-{pron} maintenant ?", "{name} a maintenant {c} {obj}."),
        "de": ("{name} hat {a} {obj}. {Pron} verschenkt {b} davon. "
               "Wie viele {obj} hat {name} jetzt?", "{name} hat jetzt {c} {obj}."),
        "es": ("{name} tiene {a} {obj}. Le regala {b} {obj} a un amigo. "
               "¿{Cuantos} {obj} tiene {name} ahora?", "Ahora {name} tiene {c} {obj}."),
        "zh": ("{name}有{a}{cl}{obj}。{Pron}把其中{b}{cl}送给了朋友。{name}现在有多少{cl}{obj}？",
               "{name}现在有{c}{cl}{obj}。"),
        "sw": ("{name} ana {obj} {a}. Anampa rafiki yake {obj} {b}. "
               "Sasa {name} ana {obj} {ngapi}?", "Sasa {name} ana {obj} {c}."),
        "ru": ("У {name_gen} {a} {obj_a}. {Pron} отдаёт другу {b} {obj_b}. "
               "Сколько {obj_many} теперь у {name_gen}?", "Теперь у {name_gen} {c} {obj_c}."),
    },
}  # fmt: skip

ARITHMETIC: Templates = {
    "plus": {
        "en": ("What is {a} plus {b}?", "{a} plus {b} equals {c}."),
        "fr": ("Combien font {a} plus {b} ?", "{a} plus {b} égale {c}."),
        "de": ("Wie viel ist {a} plus {b}?", "{a} plus {b} ist gleich {c}."),
        "es": ("¿Cuánto es {a} más {b}?", "{a} más {b} es igual a {c}."),
        "zh": ("{a}加{b}等于多少？", "{a}加{b}等于{c}。"),
        "sw": ("{a} jumlisha {b} ni ngapi?", "{a} jumlisha {b} ni sawa na {c}."),
        "ru": ("Сколько будет {a} плюс {b}?", "{a} плюс {b} равно {c}."),
    },
    "minus": {
        "en": ("What is {a} minus {b}?", "{a} minus {b} equals {c}."),
        "fr": ("Combien font {a} moins {b} ?", "{a} moins {b} égale {c}."),
        "de": ("Wie viel ist {a} minus {b}?", "{a} minus {b} ist gleich {c}."),
        "es": ("¿Cuánto es {a} menos {b}?", "{a} menos {b} es igual a {c}."),
        "zh": ("{a}减{b}等于多少？", "{a}减{b}等于{c}。"),
        "sw": ("{a} toa {b} ni ngapi?", "{a} toa {b} ni sawa na {c}."),
        "ru": ("Сколько будет {a} минус {b}?", "{a} минус {b} равно {c}."),
    },
}

COMPARISON: Templates = {
    "larger": {
        "en": ("Which number is larger, {a} or {b}?", "{hi} is larger than {lo}."),
        "fr": ("Quel nombre est le plus grand, {a} ou {b} ?", "{hi} est plus grand que {lo}."),
        "de": ("Welche Zahl ist größer, {a} oder {b}?", "{hi} ist größer als {lo}."),
        "es": ("¿Qué número es mayor, {a} o {b}?", "{hi} es mayor que {lo}."),
        "zh": ("{a}和{b}，哪个数更大？", "{hi}比{lo}大。"),
        "sw": ("Ni namba ipi iliyo kubwa zaidi, {a} au {b}?", "{hi} ni kubwa kuliko {lo}."),
        "ru": ("Какое число больше: {a} или {b}?", "{hi} больше, чем {lo}."),
    },
    "smaller": {
        "en": ("Which number is smaller, {a} or {b}?", "{lo} is smaller than {hi}."),
        "fr": ("Quel nombre est le plus petit, {a} ou {b} ?", "{lo} est plus petit que {hi}."),
        "de": ("Welche Zahl ist kleiner, {a} oder {b}?", "{lo} ist kleiner als {hi}."),
        "es": ("¿Qué número es menor, {a} o {b}?", "{lo} es menor que {hi}."),
        "zh": ("{a}和{b}，哪个数更小？", "{lo}比{hi}小。"),
        "sw": ("Ni namba ipi iliyo ndogo zaidi, {a} au {b}?", "{lo} ni ndogo kuliko {hi}."),
        "ru": ("Какое число меньше: {a} или {b}?", "{lo} меньше, чем {hi}."),
    },
}

CAPITAL: dict[str, tuple[str, str]] = {
    "en": ("What is the capital of {country}?", "The capital of {country} is {capital}."),
    "fr": ("Quelle est la capitale {country} ?", "La capitale {country} est {capital}."),
    "de": (
        "Wie heißt die Hauptstadt von {country}?",
        "Die Hauptstadt von {country} ist {capital}.",
    ),
    "es": ("¿Cuál es la capital de {country}?", "La capital de {country} es {capital}."),
    "zh": ("{country}的首都是哪座城市？", "{country}的首都是{capital}。"),
    "sw": ("Mji mkuu wa {country} ni upi?", "Mji mkuu wa {country} ni {capital}."),
    "ru": ("Какой город является столицей {country}?", "Столица {country} — {capital}."),
}

WEEKDAY: Templates = {
    "after": {
        "en": ("What day comes after {day}?", "The day after {day} is {other}."),
        "fr": ("Quel jour vient après {day} ?", "Le jour qui suit {day} est {other}."),
        "de": ("Welcher Tag kommt nach {day}?", "Nach {day} kommt {other}."),
        "es": ("¿Qué día viene después del {day}?", "Después del {day} viene el {other}."),
        "zh": ("{day}的后一天是星期几？", "{day}的后一天是{other}。"),
        "sw": ("Ni siku gani iliyo baada ya {day}?", "Siku iliyo baada ya {day} ni {other}."),
        "ru": ("Какой день недели идёт после {day}?", "После {day} идёт {other}."),
    },
    "before": {
        "en": ("What day comes before {day}?", "The day before {day} is {other}."),
        "fr": ("Quel jour vient avant {day} ?", "Le jour qui précède {day} est {other}."),
        "de": ("Welcher Tag kommt vor {day}?", "Vor {day} kommt {other}."),
        "es": ("¿Qué día viene antes del {day}?", "Antes del {day} viene el {other}."),
        "zh": ("{day}的前一天是星期几？", "{day}的前一天是{other}。"),
        "sw": ("Ni siku gani iliyo kabla ya {day}?", "Siku iliyo kabla ya {day} ni {other}."),
        "ru": ("Какой день недели идёт перед {day}?", "Перед {day} идёт {other}."),
    },
}

COLOUR: dict[str, tuple[str, str]] = {
    "en": ("What colour is {thing}?", "{Thing} is {colour}."),
    "fr": ("De quelle couleur est {thing} ?", "{Thing} est {colour}."),
    "de": ("Welche Farbe hat {thing}?", "{Thing} ist {colour}."),
    "es": ("¿De qué color es {thing}?", "{Thing} es {colour}."),
    "zh": ("{thing}是什么颜色的？", "{thing}是{colour}的。"),
    "sw": ("Rangi ya {thing} ni ipi?", "Rangi ya {thing} ni {colour}."),
    "ru": ("Какого цвета {thing}?", "{Thing} {colour}."),
}

# --------------------------------------------------------------------------------------------
# Sampling (language independent) and rendering (per language)
# --------------------------------------------------------------------------------------------

Params = dict[str, Any]


def _ru_count(n: int, forms: tuple[str, str, str]) -> str:
    """Russian noun form after a numeral in nominative/inanimate-accusative position."""
    nom_sg, gen_sg, gen_pl = forms
    if 11 <= n % 100 <= 14:
        return gen_pl
    if n % 10 == 1:
        return nom_sg
    if 2 <= n % 10 <= 4:
        return gen_sg
    return gen_pl


def _cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def _sample_word_problem(rng: random.Random) -> Params:
    kind = rng.choice(("gain", "loss"))
    if kind == "gain":
        a, b = rng.randint(2, 20), rng.randint(2, 10)
        c = a + b
    else:
        a = rng.randint(5, 20)
        b = rng.randint(2, min(10, a - 2))
        c = a - b
    return {"kind": kind, "person": rng.randrange(len(PEOPLE)),
            "obj": rng.randrange(len(OBJECTS)), "a": a, "b": b, "c": c}  # fmt: skip


def _render_word_problem(lang: str, p: Params) -> tuple[str, str]:
    person, obj = PEOPLE[p["person"]], OBJECTS[p["obj"]]
    a, b, c = p["a"], p["b"], p["c"]
    f: dict[str, Any] = {"name": person.names[lang], "a": a, "b": b, "c": c}
    if lang in PRONOUNS:
        f["Pron"] = PRONOUNS[lang][person.gender]
        f["pron"] = f["Pron"].lower()
    if lang == "en":
        f["obj"] = obj.en
    elif lang == "fr":
        f["obj"], f["de_obj"] = obj.fr
    elif lang == "de":
        f["obj"] = obj.de
    elif lang == "es":
        f["obj"] = obj.es[0]
        f["Cuantos"] = "Cuántas" if obj.es[1] == "f" else "Cuántos"
    elif lang == "zh":
        f["obj"], f["cl"] = obj.zh
    elif lang == "sw":
        f["obj"], f["ngapi"], f["ingine"] = obj.sw
    elif lang == "ru":
        f["name_gen"] = person.ru_genitive
        f["obj_many"] = obj.ru[2]
        for key, n in (("obj_a", a), ("obj_b", b), ("obj_c", c)):
            f[key] = _ru_count(n, obj.ru)
    instruction, response = WORD_PROBLEM[p["kind"]][lang]
    return instruction.format(**f), response.format(**f)


def _sample_arithmetic(rng: random.Random) -> Params:
    op = rng.choice(("plus", "minus"))
    if op == "plus":
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        return {"op": op, "a": a, "b": b, "c": a + b}
    a = rng.randint(10, 99)
    b = rng.randint(1, a)
    return {"op": op, "a": a, "b": b, "c": a - b}


def _render_arithmetic(lang: str, p: Params) -> tuple[str, str]:
    instruction, response = ARITHMETIC[p["op"]][lang]
    return instruction.format(**p), response.format(**p)


def _sample_comparison(rng: random.Random) -> Params:
    a, b = rng.sample(range(1, 100), 2)
    return {"ask": rng.choice(("larger", "smaller")), "a": a, "b": b, "hi": max(a, b),
            "lo": min(a, b)}  # fmt: skip


def _render_comparison(lang: str, p: Params) -> tuple[str, str]:
    instruction, response = COMPARISON[p["ask"]][lang]
    return instruction.format(**p), response.format(**p)


def _sample_capital(rng: random.Random) -> Params:
    return {"country": rng.randrange(len(CAPITALS))}


def _render_capital(lang: str, p: Params) -> tuple[str, str]:
    country, capital = CAPITALS[p["country"]][lang]
    instruction, response = CAPITAL[lang]
    f = {"country": country, "capital": capital}
    return instruction.format(**f), response.format(**f)


def _sample_weekday(rng: random.Random) -> Params:
    return {"day": rng.randrange(7), "direction": rng.choice(("after", "before"))}


def _render_weekday(lang: str, p: Params) -> tuple[str, str]:
    day, direction = p["day"], p["direction"]
    other = (day + (1 if direction == "after" else -1)) % 7
    if lang == "ru":
        oblique = RU_WEEKDAYS_GENITIVE if direction == "after" else RU_WEEKDAYS_INSTRUMENTAL
        f = {"day": oblique[day], "other": WEEKDAYS["ru"][other]}
    else:
        f = {"day": WEEKDAYS[lang][day], "other": WEEKDAYS[lang][other]}
    instruction, response = WEEKDAY[direction][lang]
    return instruction.format(**f), response.format(**f)


def _sample_colour(rng: random.Random) -> Params:
    return {"thing": rng.randrange(len(COLOURS))}


def _render_colour(lang: str, p: Params) -> tuple[str, str]:
    thing, colour = COLOURS[p["thing"]][lang]
    f = {"thing": thing, "Thing": _cap(thing), "colour": colour}
    instruction, response = COLOUR[lang]
    return instruction.format(**f), response.format(**f)


Family = tuple[Callable[[random.Random], Params], Callable[[str, Params], tuple[str, str]]]

FAMILIES: dict[str, Family] = {
    "word_problem": (_sample_word_problem, _render_word_problem),
    "arithmetic": (_sample_arithmetic, _render_arithmetic),
    "comparison": (_sample_comparison, _render_comparison),
    "capital": (_sample_capital, _render_capital),
    "weekday": (_sample_weekday, _render_weekday),
    "colour": (_sample_colour, _render_colour),
}

# Fixed rotation rather than random choice: every family shows up in the first 10 items (and in
# every block of 20), and the open-ended families (thousands of distinct items) get most slots
# because the closed ones (capitals, weekdays, colours) only have a few dozen distinct items.
SCHEDULE: tuple[str, ...] = (
    "word_problem", "arithmetic", "capital", "comparison", "weekday",
    "word_problem", "colour", "arithmetic", "comparison", "word_problem",
    "word_problem", "arithmetic", "comparison", "capital", "word_problem",
    "weekday", "arithmetic", "comparison", "word_problem", "word_problem",
)  # fmt: skip

# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def _check_languages(languages: Sequence[str]) -> tuple[str, ...]:
    if isinstance(languages, str):
        languages = (languages,)
    langs = tuple(languages)
    for lang in langs:
        if lang not in LANGUAGES:
            raise ValueError(f"unsupported language {lang!r}; supported: {', '.join(LANGUAGES)}")
    if not langs:
        raise ValueError(f"no languages given; supported: {', '.join(LANGUAGES)}")
    if len(set(langs)) != len(langs):
        raise ValueError(f"duplicate language codes in {list(langs)}")
    return langs


def build_polyglot(
    n_items: int, languages: Sequence[str] = LANGUAGES, seed: int = 0
) -> list[dict[str, str]]:
    """Generate ``n_items`` parallel items rendered in every requested language.

    Sampling never depends on ``languages``, so a language subset yields exactly the same rows
    as the full set, and ``n_items=k`` is a prefix of any larger build with the same seed.
    """
    if n_items < 0:
        raise ValueError(f"n_items must be >= 0, got {n_items}")
    langs = _check_languages(languages)
    rng = random.Random(seed)
    width = max(6, len(str(max(n_items - 1, 0))))
    rows: list[dict[str, str]] = []
    for i in range(n_items):
        family = SCHEDULE[i % len(SCHEDULE)]
        sample, render = FAMILIES[family]
        params = sample(rng)
        item_id = f"{i:0{width}d}"
        for lang in langs:
            instruction, response = render(lang, params)
            rows.append({"id": item_id, "lang": lang, "instruction": instruction,
                         "response": response, "family": family})  # fmt: skip
    return rows


def parallel_pairs(
    rows: Iterable[dict], dominant: str = "en", field: str = "instruction"
) -> list[dict[str, str]]:
    """Pair each non-dominant row with the dominant-language row of the same ``id``.

    Output rows are ``{"id", "lang", "en", "target"}``; the ``"en"`` key always holds the
    *dominant* language's text (whatever ``dominant`` is) so the rows match the shared benchmark
    files.  Ids without a dominant-language row are dropped; a repeated (id, lang) is an error
    because the pairing would be ambiguous.
    """
    grouped: dict[str, dict[str, str]] = {}
    for row in rows:
        texts = grouped.setdefault(str(row["id"]), {})
        if row["lang"] in texts:
            raise ValueError(f"duplicate row for id {row['id']!r} and lang {row['lang']!r}")
        texts[row["lang"]] = row[field]
    pairs: list[dict[str, str]] = []
    for item_id, texts in grouped.items():
        if dominant not in texts:
            continue
        for lang, text in texts.items():
            if lang != dominant:
                pairs.append({"id": item_id, "lang": lang, "en": texts[dominant], "target": text})
    return pairs


def write_jsonl(rows: Iterable[dict], path: str | os.PathLike) -> int:
    """Write rows as UTF-8 JSON Lines (non-ASCII kept readable); returns the number written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    count = 0
    with path.open("w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point: write the set and its instruction pairs, print counts per language."""
    parser = argparse.ArgumentParser(
        prog="python -m data.polyglot", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--items", type=int, default=1000, help="items per language")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--languages", default=",".join(LANGUAGES),
                        help="comma-separated codes (default: all)")  # fmt: skip
    parser.add_argument("--dominant", default="en", help="language the pairs are aligned to")
    parser.add_argument("--pair-field", default="instruction", choices=("instruction", "response"))
    args = parser.parse_args(argv)
    languages = [code.strip() for code in args.languages.split(",") if code.strip()]
    try:
        rows = build_polyglot(args.items, languages, seed=args.seed)
    except ValueError as exc:
        parser.error(str(exc))
    out = Path(args.out)
    n_rows = write_jsonl(rows, out / "polyglot.jsonl")
    n_pairs = write_jsonl(
        parallel_pairs(rows, dominant=args.dominant, field=args.pair_field), out / "pairs.jsonl"
    )
    per_lang = Counter(row["lang"] for row in rows)
    for lang in languages:
        print(f"{lang}\t{per_lang[lang]}")
    print(f"wrote {n_rows} rows to {out / 'polyglot.jsonl'}")
    print(f"wrote {n_pairs} pairs to {out / 'pairs.jsonl'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
