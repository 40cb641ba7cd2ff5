"""Build country_qa.jsonl (capital and continent questions with alias lists) from the `countryinfo` wheel's data.

Run once by hand: `pip download --no-deps countryinfo==1.0.1`, unzip the wheel, then
`python make_country_qa.py path/to/countryinfo/data > country_qa.jsonl`. The output is committed; mdxlib never
imports countryinfo. See README.md for provenance and the hand-made corrections below.
"""
import json
import re
import sys
import unicodedata
from pathlib import Path

SKIP = {  # duplicates, outdated or contested entries of countryinfo 1.0.1
    "Antilles néerlandaises", "Vatican City State", "Palestine, State of", "Palestine", "Serbia and Montenegro",
    "Bonaire, Sint Eustatius and Saba", "Hong Kong", "French Southern and Antarctic Lands", "Tokelau",
    "British Indian Ocean Territory", "South Georgia",
}
RENAME = {"Swaziland": "Eswatini", "Republic of Macedonia": "North Macedonia", "Holy See (Vatican City State)": "Vatican City",
          "Czech Republic": "Czechia", "East Timor": "Timor-Leste"}
CAPITAL_ALIASES = {  # extra accepted answers: old names, transliterations, co-capitals
    "United States": ["Washington", "Washington, D.C."], "Ukraine": ["Kiev"], "Kazakhstan": ["Astana"],
    "China": ["Peking"], "Bolivia": ["La Paz"], "South Africa": ["Cape Town", "Bloemfontein"],
    "Sri Lanka": ["Sri Jayawardenepura Kotte", "Kotte"], "Malaysia": ["Putrajaya"], "Eswatini": ["Mbabane"],
    "Myanmar": ["Nay Pyi Taw", "Naypyitaw"], "Mongolia": ["Ulan Bator"], "Kiribati": ["Tarawa"],
    "San Marino": ["San Marino"], "Benin": ["Porto Novo"], "Yemen": ["Sanaa"], "Antigua and Barbuda": ["St. John's"],
    "Grenada": ["Saint George's"], "Guernsey": ["Saint Peter Port"], "Jersey": ["St. Helier"],
    "French Polynesia": ["Papeete"],
    "Western Sahara": ["Laayoune", "El Aaiun"], "Guam": ["Hagatna"], "Trinidad and Tobago": ["Port-of-Spain"],
}
SOUTH_AMERICA = {"Argentina", "Bolivia", "Brazil", "Chile", "Colombia", "Ecuador", "Guyana", "Paraguay", "Peru",
                 "Suriname", "Uruguay", "Venezuela", "French Guiana", "Falkland Islands"}
TRANSCONTINENTAL = {"Russia": ["Asia"], "Turkey": ["Europe"], "Georgia": ["Europe"], "Armenia": ["Europe"],
                    "Azerbaijan": ["Europe"], "Cyprus": ["Europe"], "Kazakhstan": ["Europe"], "Egypt": ["Asia"]}
CONTINENT_ALIASES = {"Oceania": ["Australia", "Australasia"], "North America": ["Central America", "Caribbean"]}


def norm(s):
    s = unicodedata.normalize("NFKD", s).encode("ascii", "ignore").decode().lower()
    return re.sub(r"\s+", " ", re.sub(r"[^a-z0-9 ]", " ", s.replace("'", ""))).strip()


def continent(d, name):
    if d["region"] == "Americas":
        return "South America" if name in SOUTH_AMERICA else "North America"
    return d["region"]


def main(folder):
    rows, seen = [], set()
    for f in sorted(Path(folder).glob("*.json")):
        d = json.loads(f.read_text())
        cap = d.get("capital")
        if not isinstance(cap, str) or not cap or d["name"] in SKIP:
            continue
        name = RENAME.get(d["name"], d["name"])
        if name in seen:
            continue
        seen.add(name)
        country = name if not name.startswith("The ") else name[4:]
        q_name = ("the " + country) if country in {"Bahamas", "Gambia", "Netherlands", "Philippines", "United States",
                                                   "United Kingdom", "United Arab Emirates", "Maldives", "Comoros",
                                                   "Seychelles", "Marshall Islands", "Solomon Islands", "Cayman Islands",
                                                   "Faroe Islands", "Falkland Islands", "Cook Islands",
                                                   "Northern Mariana Islands", "Turks and Caicos Islands",
                                                   "Democratic Republic of the Congo", "Republic of the Congo",
                                                   "Central African Republic", "Dominican Republic",
                                                   "Federated States of Micronesia", "Czech Republic",
                                                   "Cocos (Keeling) Islands", "Pitcairn Islands", "Åland Islands"} else country
        aliases = [cap, *CAPITAL_ALIASES.get(name, [])]
        if not any(re.search(rf"\b{re.escape(norm(a))}\b", norm(country)) for a in aliases):  # "Singapore" would leak
            rows.append(dict(country=country, kind="capital", question=f"What is the capital of {q_name}?",
                             answer=cap, aliases=sorted({a for a in aliases}, key=aliases.index)))
        cont = continent(d, name)
        conts = [cont, *TRANSCONTINENTAL.get(name, [])]
        conts += [a for c in conts for a in CONTINENT_ALIASES.get(c, [])]
        rows.append(dict(country=country, kind="continent", question=f"On which continent is {q_name}?",
                         answer=cont, aliases=conts))
    rows.sort(key=lambda r: (r["kind"], r["country"]))
    for i, r in enumerate(rows):
        print(json.dumps(dict(id=i, **r), ensure_ascii=False))


if __name__ == "__main__":
    main(sys.argv[1])
