# Source this file (bash) to build gmpq: it runs setup.sh, then points torch-sys at the
# virtualenv's libtorch. The built binary carries an rpath to it, so running gmpq needs none
# of this.
_gmpq_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$_gmpq_root/scripts/setup.sh" || return 1 2>/dev/null || exit 1
export VIRTUAL_ENV="${GMPQ_VENV:-$_gmpq_root/.venv}"
export PATH="$VIRTUAL_ENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
unset _gmpq_root
