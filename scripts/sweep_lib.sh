# shellcheck shell=bash disable=SC2034  # words is read by the sourcing script
# Helpers shared by the top-level *.sh scripts (sourced, not run). Plain bash 3.2+.
# The sourcing script sets CALLER_DIR=$PWD before changing directory.

die() {
  echo "error: $*" >&2
  exit 1
}

# resolve_from_caller VAR [existing]: make a relative path in $VAR absolute,
# relative to the caller's directory. With "existing", only if it exists there
# (so "THUDM/CogVideoX-5b" stays a hub id and repo-relative paths still work).
resolve_from_caller() {
  local value=${!1:-}
  case $value in
    '' | /*) return 0 ;;
  esac
  if [[ "${2:-}" == existing && ! -e "$CALLER_DIR/$value" ]]; then
    return 0
  fi
  printf -v "$1" '%s/%s' "$CALLER_DIR" "$value"
}

# split_words STRING: split STRING on whitespace into the array `words`
# (no quote removal, no globbing).
split_words() {
  local IFS=$' \t\n'
  words=()
  read -r -d '' -a words <<<"$1" || true
}

# split_list VAR: split_words on the value of $VAR, which must not be blank.
split_list() {
  [[ "${!1}" =~ [^[:space:]] ]] || die "$1 is empty"
  split_words "${!1}"
}
