"""Small math data sets written on the spot, in the shapes of GSM8K and MATH, so that tests
of `task.name=math` need no download. The problems are made up; the answers are checked
by hand (GOLDS)."""

import json
import pathlib

import pyarrow as pa
import pyarrow.parquet as pq

# GSM8K's shape: `question`, and an `answer` whose last line is "#### <number>", with the
# <<calculator>> annotations and thousands commas the real set has.
GSM8K_ROWS = [
    {
        "question": "A baker fills 3 trays with 12 muffins each. How many muffins does she bake?",
        "answer": "She bakes 3 * 12 = <<3*12=36>>36 muffins.\n#### 36",
    },
    {
        "question": "Sam has 50 dollars and spends 8 dollars on lunch. How many dollars does he have left?",
        "answer": "He has 50 - 8 = <<50-8=42>>42 dollars left.\n#### 42",
    },
    {
        "question": "A farm has 1,000 chickens and buys 234 more. How many chickens does it have now?",
        "answer": "It has 1,000 + 234 = <<1000+234=1234>>1,234 chickens.\n#### 1,234",
    },
    {
        "question": "Lena reads 15 pages a day for 4 days, then 10 more pages. How many pages does she read?",
        "answer": "First 15 * 4 = <<15*4=60>>60 pages, then 60 + 10 = <<60+10=70>>70 pages.\n#### 70",
    },
    {
        "question": "A 9 meter rope is cut into 4 equal pieces. How long is each piece, in meters?",
        "answer": "Each piece is 9 / 4 = <<9/4=2.25>>2.25 meters.\n#### 2.25",
    },
    {
        "question": "It was 3 degrees outside, then the temperature fell by 8 degrees. What is it now?",
        "answer": "It is now 3 - 8 = <<3-8=-5>>-5 degrees.\n#### -5",
    },
]
GSM8K_GOLDS = ["36", "42", "1234", "70", "2.25", "-5"]

# MATH's shape: `problem`, and a `solution` in LaTeX with the answer in the last \boxed{}.
MATH_ROWS = [
    {
        "problem": "What is $\\frac{1}{4} + \\frac{1}{4}$?",
        "solution": "We have $\\frac{1}{4} + \\frac{1}{4} = \\frac{2}{4} = \\boxed{\\frac{1}{2}}$.",
    },
    {
        "problem": "Compute $7 \\times 6$.",
        "solution": "Since $7 \\times 5 = 35$, we get $35 + 7 = \\boxed{42}$.",
    },
    {
        "problem": "Simplify $\\sqrt{12}$.",
        "solution": "$\\sqrt{12} = \\sqrt{4 \\cdot 3} = \\boxed{2\\sqrt{3}}$.",
    },
    {
        "problem": "Find all real $x$ with $x^2 = 4$.",
        "solution": "Both $2^2$ and $(-2)^2$ are $4$, so the solutions are $\\boxed{\\{-2, 2\\}}$.",
    },
]
MATH_GOLDS = ["\\frac{1}{2}", "42", "2\\sqrt{3}", "\\{-2, 2\\}"]


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> pathlib.Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_math_sample(dir) -> dict[str, pathlib.Path]:
    """Writes the samples into `dir`: "gsm8k" (gsm8k.jsonl), "math" (math.jsonl) and
    "parquet" (gsm8k.parquet, the GSM8K rows). Returns their paths by those names."""
    dir = pathlib.Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    parquet = dir / "gsm8k.parquet"
    pq.write_table(pa.Table.from_pylist(GSM8K_ROWS), parquet)
    return {
        "gsm8k": write_jsonl(dir / "gsm8k.jsonl", GSM8K_ROWS),
        "math": write_jsonl(dir / "math.jsonl", MATH_ROWS),
        "parquet": parquet,
    }
