"""Hand-made benchmark rows shared by the evaluation tests."""

XCOPA = [
    ("The man turned on the faucet.", "The toilet filled with water.", "Water flowed out.", "effect", 1),
    ("The girl found a bug in her cereal.", "She poured milk.", "She lost her appetite.", "effect", 1),
    ("The woman retired.", "She received her pension.", "She paid off her mortgage.", "effect", 0),
    ("I wanted to conserve energy.", "I swept the floor.", "I shut off the light.", "cause", 1),
    ("The meat browned.", "The cook froze it.", "The cook grilled it.", "cause", 1),
]  # fmt: skip
PAIRS = [
    ("She has three apples.", "Ana tufaha tatu."),
    ("The train leaves at noon.", "Treni inaondoka saa sita."),
    ("How many books are there?", "Kuna vitabu vingapi?"),
    ("My brother is a teacher.", "Kaka yangu ni mwalimu."),
]
