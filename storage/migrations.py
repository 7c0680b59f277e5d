"""Schema migrations.

Each migration is a small named function. Once a migration has shipped it is
never edited: a schema change is a new function appended below.
"""

from sqlite_utils import Migrations

migrations = Migrations("learning-chatbot")


@migrations(name="m001_initial")
def m001_initial(db):
    db.execute(
        """
        CREATE TABLE conversations (
            id TEXT PRIMARY KEY,
            session_id TEXT,
            user TEXT,
            created_at TEXT NOT NULL
        )
        """
    )
    db.execute(
        """
        CREATE TABLE responses (
            id TEXT PRIMARY KEY,
            conversation_id TEXT NOT NULL REFERENCES conversations(id),
            -- the messages that were the prompt, as JSON [{role, content}, ...]
            prompt TEXT NOT NULL,
            -- sha256 of the canonical prompt JSON: alternatives to the same
            -- prompt (regenerate) share it, which is what makes a pair
            prompt_hash TEXT NOT NULL,
            reply TEXT NOT NULL,
            model_version TEXT NOT NULL,
            generation TEXT NOT NULL DEFAULT '{}',
            latency_ms REAL,
            prompt_tokens INTEGER,
            completion_tokens INTEGER,
            finish_reason TEXT,
            session_id TEXT,
            user TEXT,
            created_at TEXT NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX idx_responses_conversation ON responses(conversation_id)")
    db.execute("CREATE INDEX idx_responses_prompt_hash ON responses(prompt_hash)")
    db.execute(
        """
        CREATE TABLE feedback (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            response_id TEXT NOT NULL REFERENCES responses(id),
            session_id TEXT,
            user TEXT,
            -- +1 thumbs-up, -1 thumbs-down, 0 a vote taken back
            value INTEGER NOT NULL CHECK (value IN (-1, 0, 1)),
            comment TEXT,
            created_at TEXT NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX idx_feedback_response ON feedback(response_id)")
    db.execute(
        """
        CREATE TABLE runs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL,
            status TEXT NOT NULL,
            started_at TEXT NOT NULL,
            finished_at TEXT,
            watermark INTEGER,
            config TEXT NOT NULL DEFAULT '{}',
            metrics TEXT NOT NULL DEFAULT '{}',
            progress TEXT NOT NULL DEFAULT '{}',
            error TEXT,
            pid INTEGER
        )
        """
    )
    db.execute(
        """
        CREATE TABLE adapters (
            version TEXT PRIMARY KEY,
            number INTEGER NOT NULL UNIQUE,
            path TEXT NOT NULL,
            base_model TEXT NOT NULL,
            run_id INTEGER REFERENCES runs(id),
            status TEXT NOT NULL
                CHECK (status IN ('candidate', 'active', 'retired', 'rejected')),
            reason TEXT,
            watermark INTEGER,
            metrics TEXT NOT NULL DEFAULT '{}',
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )
        """
    )
    # At most one active adapter; no row active means v0 (the base) serves.
    db.execute(
        "CREATE UNIQUE INDEX idx_adapters_one_active ON adapters(status) "
        "WHERE status = 'active'"
    )


@migrations(name="m002_registry_and_operations")
def m002_registry_and_operations(db):
    # Every change of the active version, in order: what rollback walks back.
    db.execute(
        """
        CREATE TABLE activations (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            version TEXT NOT NULL,
            previous TEXT NOT NULL,
            -- promote (an operator), gate (a retrain that passed), rollback
            action TEXT NOT NULL,
            actor TEXT,
            reason TEXT,
            created_at TEXT NOT NULL
        )
        """
    )
    # Small operator state that must survive a restart (the schedule's pause).
    db.execute(
        """
        CREATE TABLE settings (
            key TEXT PRIMARY KEY,
            value TEXT NOT NULL,
            updated_at TEXT NOT NULL
        )
        """
    )
    # Which machine a run's pid belongs to, and when it last reported: a run
    # whose process is gone is marked failed instead of staying "running".
    db.execute("ALTER TABLE runs ADD COLUMN host TEXT")
    db.execute("ALTER TABLE runs ADD COLUMN heartbeat_at TEXT")
    db.execute("CREATE INDEX idx_feedback_created ON feedback(created_at)")
    db.execute("CREATE INDEX idx_runs_status ON runs(status)")


@migrations(name="m003_rater_identity")
def m003_rater_identity(db):
    # How the rater of a reply or a thumb was known (login, api_key, session,
    # claimed, address), and the `user` an API client sent, kept as sent:
    # with a login it is a label, never the rater.
    for table in ("responses", "feedback"):
        db.execute(f"ALTER TABLE {table} ADD COLUMN identified_by TEXT")
        db.execute(f"ALTER TABLE {table} ADD COLUMN claimed_user TEXT")


@migrations(name="m004_corrections")
def m004_corrections(db):
    # A better reply a person wrote in place of the bot's: a thumbs-down row
    # that carries the text it should have been.
    db.execute("ALTER TABLE feedback ADD COLUMN correction TEXT")


@migrations(name="m005_live_trials")
def m005_live_trials(db):
    # A version tried on live thumbs against another: a canary (a candidate
    # on a share of new conversations beside the active version) or the
    # watch after a promotion (the new version against the one before it).
    db.execute(
        """
        CREATE TABLE trials (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            kind TEXT NOT NULL CHECK (kind IN ('canary', 'watch')),
            -- the version on trial, and the one it is compared with
            version TEXT NOT NULL,
            other TEXT NOT NULL,
            -- canary: the share of new conversations it serves
            share REAL,
            status TEXT NOT NULL,
            reason TEXT,
            -- the sequential test's last look, as JSON
            evidence TEXT NOT NULL DEFAULT '{}',
            started_at TEXT NOT NULL,
            ended_at TEXT
        )
        """
    )
    db.execute("CREATE INDEX idx_trials_status ON trials(status)")
    # The sequential test's figures behind a canary's or a watch's decision.
    db.execute("ALTER TABLE activations ADD COLUMN evidence TEXT")
    db.execute("CREATE INDEX idx_responses_version ON responses(model_version, created_at)")
