"""Deterministic, realistic demo data for CFI's source DB (and, through
:mod:`cfi_pipelines.devtools.seed_mycfia`, MyCfia's campaigns).

Scale 1 is a quick demo (~10k stock rows); scale 100 gives ~1M stock rows. The
same ``seed`` and day give the same data. Dates are relative to the seeding day
so that "overdue" stays meaningful.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import sqlalchemy as sa

from cfi_pipelines.db import engine_for, insert_rows, redact
from cfi_pipelines.devtools.seed_mycfia import seed_mycfia
from cfi_pipelines.model import cfi_source as src
from cfi_pipelines.settings import Settings
from cfi_pipelines.views.refresh import init_common

FIRST_NAMES = [
    "Camille",
    "Léa",
    "Manon",
    "Chloé",
    "Inès",
    "Jade",
    "Louise",
    "Emma",
    "Alice",
    "Lina",
    "Hugo",
    "Lucas",
    "Louis",
    "Gabriel",
    "Arthur",
    "Jules",
    "Raphaël",
    "Nathan",
    "Théo",
    "Maël",
    "Élise",
    "Zoé",
    "Noémie",
    "Céline",
    "Hélène",
    "François",
    "Jérôme",
]
LAST_NAMES = [
    "Martin",
    "Bernard",
    "Dubois",
    "Thomas",
    "Robert",
    "Richard",
    "Petit",
    "Durand",
    "Leroy",
    "Moreau",
    "Simon",
    "Laurent",
    "Lefèvre",
    "Michel",
    "Garcia",
    "David",
    "Bertrand",
    "Roux",
    "Vincent",
    "Fournier",
    "Morel",
    "Girard",
    "André",
    "Mercier",
    "Dupont",
    "Lambert",
    "Bonnet",
    "François",
    "Martinez",
    "Legrand",
    "Garnier",
    "Faure",
    "Rousseau",
    "Blanc",
    "Guérin",
]
CITIES = (
    ("Lille", "59000"),
    ("Roubaix", "59100"),
    ("Amiens", "80000"),
    ("Arras", "62000"),
    ("Marseille", "13001"),
    ("Nice", "06000"),
    ("Toulon", "83000"),
    ("Montpellier", "34000"),
    ("Nantes", "44000"),
    ("Rennes", "35000"),
    ("Brest", "29200"),
    ("Angers", "49000"),
    ("Lyon", "69001"),
    ("Grenoble", "38000"),
    ("Saint-Étienne", "42000"),
    ("Annecy", "74000"),
)
CATEGORIES = {
    "Épicerie fine": (
        "Confiture d'abricot",
        "Miel de lavande",
        "Huile d'olive",
        "Sel de Guérande",
        "Moutarde à l'ancienne",
    ),
    "Cave": ("Côtes-du-Rhône", "Muscadet", "Cidre brut", "Champagne brut", "Bordeaux supérieur"),
    "Crèmerie": ("Comté 18 mois", "Camembert", "Beurre demi-sel", "Crème fraîche", "Roquefort"),
    "Boulangerie": ("Pain de campagne", "Brioche", "Croissant", "Baguette tradition", "Fougasse"),
    "Maison": (
        "Savon de Marseille",
        "Bougie parfumée",
        "Torchon lin",
        "Panier osier",
        "Vase en grès",
    ),
}
OPERATION_KINDS = ("promotion", "destockage", "lancement", "fidelite")
CHANNELS = (
    ("email", "E-mail"),
    ("sms", "SMS"),
    ("courrier", "Courrier"),
    ("push", "Notification push"),
)
SEGMENTS = ("premium", "fidele", "occasionnel", "nouveau", "inactif")

# tenant hierarchy: group -> regions -> stores (+ an inactive store per region)
REGIONS = (("NORD", "CFI Nord"), ("SUD", "CFI Sud"), ("OUEST", "CFI Ouest"), ("EST", "CFI Est"))


def _tenants(anchor: datetime) -> list[tuple]:
    rows = [(1, "CFI", "Groupe CFI", None, anchor)]
    next_id = 2
    for r_code, r_name in REGIONS:
        region_id = next_id
        rows.append((region_id, r_code, r_name, 1, anchor))
        next_id += 1
        for k in range(1, 4):
            rows.append((next_id, f"{r_code}-{k:02d}", f"{r_name} magasin {k}", region_id, anchor))
            next_id += 1
        # a store opened but with no activity yet
        rows.append((next_id, f"{r_code}-NEW", f"{r_name} nouveau magasin", region_id, anchor))
        next_id += 1
    return rows


def seed_source(
    engine: sa.Engine, *, scale: int = 1, seed: int = 0, today: date | None = None
) -> dict[str, int]:
    """(Re)create CFI's source schema and fill it; returns row counts per table."""
    if scale < 1:
        raise ValueError("scale must be >= 1")
    rng = random.Random(seed)
    today = today or datetime.now(UTC).date()
    anchor = datetime(today.year, today.month, today.day) - timedelta(hours=1)

    def ts(max_days: int = 30) -> datetime:
        return anchor - timedelta(minutes=rng.randrange(max_days * 24 * 60))

    tenants = _tenants(anchor)
    stores = [t for t in tenants if t[3] is not None and t[3] != 1 and not t[1].endswith("-NEW")]
    counts: dict[str, int] = {}

    src.metadata.drop_all(engine)
    src.metadata.create_all(engine)
    with engine.begin() as conn:
        counts["tenants"] = insert_rows(conn, src.tenants, tenants)
        counts["channels"] = insert_rows(
            conn, src.channels, [(i + 1, c, n, anchor) for i, (c, n) in enumerate(CHANNELS)]
        )

        warehouses = []
        for t in stores:
            for k in (1, 2):
                city, _ = rng.choice(CITIES)
                warehouses.append(
                    (
                        len(warehouses) + 1,
                        t[0],
                        f"WH-{t[1]}-{k}",
                        f"Entrepôt {city} {k}",
                        city,
                        ts(),
                    )
                )
        counts["warehouses"] = insert_rows(conn, src.warehouses, warehouses)
        wh_by_tenant: dict[int, list[int]] = {}
        for w in warehouses:
            wh_by_tenant.setdefault(w[1], []).append(w[0])

        n_products = 5000 * scale // len(stores) * len(stores)
        product_tenant: list[int] = []
        product_price: list[Decimal] = []

        def products() -> Iterator[tuple]:
            cats = list(CATEGORIES.items())
            for pid in range(1, n_products + 1):
                tenant = stores[(pid - 1) % len(stores)][0]
                cat, names = cats[pid % len(cats)]
                price = Decimal(rng.randrange(150, 9000)) / 100
                product_tenant.append(tenant)
                product_price.append(price)
                yield (
                    pid,
                    tenant,
                    f"SKU{pid:07d}",
                    f"{names[pid % len(names)]} n°{pid}",
                    cat,
                    price,
                    ts(),
                )

        counts["products"] = insert_rows(conn, src.products, products())

        def stock_levels() -> Iterator[tuple]:
            sid = 0
            for pid in range(1, n_products + 1):
                for wid in wh_by_tenant[product_tenant[pid - 1]]:
                    sid += 1
                    qty = rng.randrange(0, 500)
                    yield (
                        sid,
                        product_tenant[pid - 1],
                        pid,
                        wid,
                        qty,
                        rng.randrange(0, qty // 4 + 1),
                        ts(),
                    )

        counts["stock_levels"] = insert_rows(conn, src.stock_levels, stock_levels())

        def movements() -> Iterator[tuple]:
            for mid in range(1, counts["stock_levels"] // 2 + 1):
                moved = ts(60)
                yield (
                    mid,
                    rng.randrange(1, counts["stock_levels"] + 1),
                    rng.choice(("in", "out", "adjust")),
                    rng.randrange(1, 50),
                    moved,
                    moved,
                )

        counts["stock_movements"] = insert_rows(conn, src.stock_movements, movements())

        clients = []
        for cid in range(1, 2000 * scale + 1):
            first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
            city, postal = rng.choice(CITIES)
            email = f"{first}.{last}{cid}@exemple.fr".lower()
            phone = f"+336{rng.randrange(10_000_000, 99_999_999)}"
            clients.append(
                (
                    cid,
                    stores[cid % len(stores)][0],
                    f"CLI{cid:07d}",
                    f"{first} {last}",
                    email,
                    phone,
                    city,
                    postal,
                    rng.choice(SEGMENTS),
                    ts(),
                )
            )
        counts["clients"] = insert_rows(conn, src.clients, clients)
        clients_by_tenant: dict[int, list[int]] = {}
        for c in clients:
            clients_by_tenant.setdefault(c[1], []).append(c[0])

        operations, op_products = [], []
        for oid in range(1, 20 * scale + 1):
            store_idx = oid % len(stores)
            tenant = stores[store_idx][0]
            start = today + timedelta(days=rng.randrange(-60, 30))
            status = (
                "closed"
                if start + timedelta(days=21) < today
                else ("active" if start <= today else "planned")
            )
            kind = rng.choice(OPERATION_KINDS)
            operations.append(
                (
                    oid,
                    tenant,
                    f"OP{oid:05d}",
                    f"Opération {kind} {start:%B %Y}",
                    kind,
                    status,
                    start,
                    start + timedelta(days=21),
                    Decimal(rng.randrange(1000, 50000)),
                    ts(),
                )
            )
            # products of this store: pid - 1 == store_idx (mod number of stores)
            tenant_products = range(
                store_idx + 1, min(n_products, 200 * len(stores)) + 1, len(stores)
            )
            for pid in rng.sample(tenant_products, k=min(5, len(tenant_products))):
                op_products.append((oid, pid, Decimal(rng.choice((5, 10, 15, 20, 30))), ts()))
        counts["operations"] = insert_rows(conn, src.operations, operations)
        counts["operation_products"] = insert_rows(conn, src.operation_products, op_products)

        invoices, lines, payments = [], [], []
        for iid in range(1, 1000 * scale + 1):
            tenant = stores[iid % len(stores)][0]
            client = rng.choice(clients_by_tenant[tenant])
            issued = today - timedelta(days=rng.randrange(0, 120))
            due = issued + timedelta(days=30)
            total = Decimal(0)
            for _ in range(rng.randrange(1, 6)):
                pid = rng.randrange(1, n_products + 1)
                qty = rng.randrange(1, 20)
                price = product_price[pid - 1]
                lines.append((len(lines) + 1, iid, pid, qty, price, Decimal("0.2000"), ts()))
                total += qty * price * Decimal("1.2")
            r = rng.random()
            status = "cancelled" if r < 0.02 else "issued"
            # paid: most; unpaid past due (late): ~10 %; unpaid not yet due: the rest
            if status == "issued" and r < 0.9 and (due >= today or r < 0.85):
                payments.append(
                    (
                        len(payments) + 1,
                        iid,
                        total.quantize(Decimal("0.01")),
                        min(due, today),
                        rng.choice(("virement", "carte", "cheque")),
                        ts(),
                    )
                )
                status = "paid"
            invoices.append(
                (iid, tenant, client, f"FAC-{issued:%Y}-{iid:07d}", issued, due, status, ts())
            )
        counts["invoices"] = insert_rows(conn, src.invoices, invoices)
        counts["invoice_lines"] = insert_rows(conn, src.invoice_lines, lines)
        counts["payments"] = insert_rows(conn, src.payments, payments)

        campaigns, targets, results = [], [], []
        for cid in range(1, 10 * scale + 1):
            op = operations[cid % len(operations)]
            start = op[6]
            status = (
                "done" if op[5] == "closed" else ("running" if op[5] == "active" else "scheduled")
            )
            campaigns.append(
                (
                    cid,
                    op[1],
                    op[0],
                    rng.randrange(1, len(CHANNELS) + 1),
                    f"CMP{cid:05d}",
                    f"Campagne {op[3].lower()}",
                    status,
                    start,
                    op[7],
                    Decimal(rng.randrange(500, 5000)),
                    ts(),
                )
            )
            pool = clients_by_tenant[op[1]]
            for client in rng.sample(pool, k=min(len(pool), rng.randrange(20, 100))):
                targets.append((len(targets) + 1, cid, client, rng.choice(SEGMENTS), ts()))
            if status != "scheduled":
                for d in range(rng.randrange(1, 4)):
                    sent = rng.randrange(100, 2000)
                    opened = int(sent * rng.uniform(0.1, 0.5))
                    clicked = int(opened * rng.uniform(0.05, 0.3))
                    converted = int(clicked * rng.uniform(0.05, 0.4))
                    results.append(
                        (
                            len(results) + 1,
                            cid,
                            start + timedelta(days=d),
                            sent,
                            opened,
                            clicked,
                            converted,
                            Decimal(converted * rng.randrange(20, 120)),
                            ts(),
                        )
                    )
        counts["campaigns"] = insert_rows(conn, src.campaigns, campaigns)
        counts["campaign_targets"] = insert_rows(conn, src.campaign_targets, targets)
        counts["campaign_results"] = insert_rows(conn, src.campaign_results, results)
    return counts


def source_is_seeded(settings: Settings) -> bool:
    """Whether CFI's source DB has its tables (the demo and ``dev`` seed it otherwise)."""
    try:
        with engine_for(settings.source_url).connect() as conn:
            return sa.inspect(conn).has_table("stock_levels")
    except sa.exc.OperationalError:
        return False


def seed_all(
    settings: Settings,
    *,
    scale: int = 1,
    seed: int = 0,
    only: Sequence[str] = ("source", "common", "mycfia"),
) -> list[str]:
    """(Re)create and fill the databases named in ``only`` (all three by default): one line
    per database for the operator. MyCfia's demo campaigns are drawn from the source DB,
    which must be seeded already when it is not in ``only``.

    No check here: ``cfi-pipelines seed`` asks :mod:`~cfi_pipelines.devtools.seed_plan`
    first; ``demo`` and ``dev`` call it only when the source DB is missing.
    """
    source = engine_for(settings.source_url)
    lines = []
    if "source" in only:
        counts = seed_source(source, scale=scale, seed=seed)
        lines.append(
            f"CFI source DB ({redact(settings.source_url)}): {len(counts)} tables: "
            + ", ".join(f"{k} {v}" for k, v in counts.items())
        )
    if "common" in only:
        init_common(engine_for(settings.common_url))
        lines.append(f"common DB ({redact(settings.common_url)}): schema ready")
    if "mycfia" in only:
        mcounts = seed_mycfia(engine_for(settings.mycfia_url), source, scale=scale, seed=seed)
        lines.append(
            f"MyCfia DB ({redact(settings.mycfia_url)}): "
            + ", ".join(f"{k} {v}" for k, v in mcounts.items())
        )
    return lines


# --------------------------------------------------------------------------- fast path
# The stocks tables generated inside the database (INSERT…SELECT over a recursive CTE
# on SQLite, generate_series on PostgreSQL): no row crosses into Python, so 10M stock
# rows take seconds per million instead of a minute. Same shapes as seed_source
# (products per store, two warehouses per store, one stock row per product and
# warehouse of its store), values from an integer hash of (seed, column, id):
# the same seed gives the same data on either database.

_HASH_MOD = 2_147_483_648


def _hash_sql(expr: str, salt: int) -> str:
    """A pseudo-random integer in [0, 32768) from integer ``expr`` and ``salt``, in SQL
    both SQLite and PostgreSQL evaluate the same way (64-bit integers, no overflow)."""
    mixed = f"((({expr}) * 2654435761 + {salt}) % 4294967296) % {_HASH_MOD}"
    return f"((({mixed}) * 1103515245 + 12345) % {_HASH_MOD} / 65536)"


def _rand_sql(expr: str, seed: int, column: int, bound: int) -> str:
    """A pseudo-random integer in [0, bound) (bound < 2**30)."""
    hi = _hash_sql(expr, seed * 1_000_003 + column * 7919)
    lo = _hash_sql(expr, seed * 1_000_003 + column * 7919 + 104_729)
    return f"(({hi} * 32768 + {lo}) % {bound})"


def _sql_literal(value) -> str:
    if isinstance(value, str):
        return "'" + value.replace("'", "''") + "'"
    return str(int(value))


def _values_cte(name: str, columns: tuple[str, ...], rows: list[tuple]) -> str:
    body = ", ".join("(" + ", ".join(_sql_literal(v) for v in row) + ")" for row in rows)
    return f"{name}({', '.join(columns)}) AS (VALUES {body})"


def seed_source_fast(
    engine: sa.Engine, *, scale: int = 1, seed: int = 0, today: date | None = None
) -> dict[str, int]:
    """(Re)create CFI's source schema and fill the stocks view's tables only, in SQL.

    ``tenants``, ``channels``, ``warehouses``, ``products`` and ``stock_levels`` get
    the same row counts as :func:`seed_source` at the same scale (scale 100 ≈ 1M
    stock rows, 1000 ≈ 10M); the other tables stay empty. For benchmarks at large
    scales; deterministic for a given ``seed`` and day. SQLite and PostgreSQL.
    """
    if scale < 1:
        raise ValueError("scale must be >= 1")
    dialect = engine.dialect.name
    if dialect not in ("sqlite", "postgresql"):
        raise ValueError(f"the fast seed supports SQLite and PostgreSQL, not {dialect}")
    rng = random.Random(seed)
    today = today or datetime.now(UTC).date()
    anchor = datetime(today.year, today.month, today.day) - timedelta(hours=1)
    tenants = _tenants(anchor)
    stores = [t for t in tenants if t[3] is not None and t[3] != 1 and not t[1].endswith("-NEW")]
    n_stores = len(stores)
    n_products = 5000 * scale // n_stores * n_stores
    n_stock = 2 * n_products

    src.metadata.drop_all(engine)
    src.metadata.create_all(engine)
    counts: dict[str, int] = {}
    warehouses = []
    for t in stores:
        for k in (1, 2):
            city, _ = rng.choice(CITIES)
            minutes = rng.randrange(30 * 24 * 60)
            warehouses.append(
                (len(warehouses) + 1, t[0], f"WH-{t[1]}-{k}", f"Entrepôt {city} {k}", city,
                 anchor - timedelta(minutes=minutes))
            )  # fmt: skip

    store_cte = _values_cte("stores", ("s", "tid"), [(i, t[0]) for i, t in enumerate(stores)])
    cats = list(CATEGORIES.items())
    cat_cte = _values_cte(
        "cats",
        ("k", "cat", "nm"),
        [(k, cat, names[k % len(names)]) for k, (cat, names) in enumerate(cats)],
    )

    def series(n: int) -> tuple[str, str]:
        """(CTE or '', FROM item) of the integers 1..n as column i."""
        if dialect == "postgresql":
            return "", f"generate_series(1::bigint, {n}::bigint) AS g(i)"
        return f"g(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM g WHERE i < {n})", "g"

    def stamp(expr: str, column: int) -> str:
        minutes = _rand_sql(expr, seed, column, 30 * 24 * 60)
        if dialect == "postgresql":
            return f"(TIMESTAMP '{anchor:%Y-%m-%d %H:%M:%S}' - {minutes} * INTERVAL '1 minute')"
        # SQLAlchemy's SQLite DateTime format, so that comparisons with bound values hold
        return f"(strftime('%Y-%m-%d %H:%M:%S', '{anchor:%Y-%m-%d %H:%M:%S}', '-' || {minutes} || ' minutes') || '.000000')"

    pad = "lpad(i::text, 7, '0')" if dialect == "postgresql" else "printf('%07d', i)"
    price = f"({_rand_sql('i', seed, 1, 8850)} + 150)"
    price = f"({price}::numeric / 100)" if dialect == "postgresql" else f"({price} / 100.0)"
    cte, frm = series(n_products)
    products_sql = (
        f"WITH {'RECURSIVE ' + cte + ', ' if cte else ''}{store_cte}, {cat_cte} "
        "INSERT INTO products (id, tenant_id, sku, name, category, unit_price, updated_at) "
        f"SELECT i, stores.tid, 'SKU' || {pad}, cats.nm || ' n°' || i, cats.cat, {price}, "
        f"{stamp('i', 2)} FROM {frm} JOIN stores ON stores.s = (i - 1) % {n_stores} "
        f"JOIN cats ON cats.k = i % {len(cats)}"
    )
    cte, frm = series(n_stock)
    qty = _rand_sql("i", seed, 3, 500)
    stock_sql = (
        f"WITH {'RECURSIVE ' + cte + ', ' if cte else ''}{store_cte} "
        "INSERT INTO stock_levels (id, tenant_id, product_id, warehouse_id, quantity, reserved, "
        "updated_at) "
        f"SELECT i, stores.tid, pid, 2 * s + 1 + k, qty, {_rand_sql('i', seed, 4, 1 << 29)} % (qty / 4 + 1), "
        f"{stamp('i', 5)} FROM (SELECT i, (i - 1) / 2 + 1 AS pid, (i - 1) % 2 AS k, "
        f"((i - 1) / 2) % {n_stores} AS s, {qty} AS qty FROM {frm}) AS x "
        "JOIN stores USING (s)"
    )
    with engine.begin() as conn:
        counts["tenants"] = insert_rows(conn, src.tenants, tenants)
        counts["channels"] = insert_rows(
            conn, src.channels, [(i + 1, c, n, anchor) for i, (c, n) in enumerate(CHANNELS)]
        )
        counts["warehouses"] = insert_rows(conn, src.warehouses, warehouses)
        # secondary indexes built once after the load, not maintained row by row
        big = (src.products, src.stock_levels)
        for table in big:
            for ix in table.indexes:
                ix.drop(conn)
        for sql in (products_sql, stock_sql):
            # psycopg's paramstyle (format) takes % for a placeholder: the modulo is %%
            conn.exec_driver_sql(sql.replace("%", "%%") if dialect == "postgresql" else sql)
        for table in big:  # (SQLite reports no rowcount for WITH … INSERT)
            counts[table.name] = conn.scalar(sa.select(sa.func.count()).select_from(table))
        for table in big:
            for ix in table.indexes:
                ix.create(conn)
    with engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
    return counts
