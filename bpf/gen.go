package bpf

// The clang version is pinned: a different clang emits a different object.
// CI installs clang-16 and llvm-16 from Debian and checks the diff is empty.
//go:generate go tool bpf2go -cc clang-16 -strip llvm-strip-16 -cflags "-O2 -g -Wall -Werror" -target amd64 -tags linux -output-dir ../internal/uprobe -go-package uprobe -type event -type site_conf -type mg_kind -type mg_key -type mg_reg -type mg_site_flag -type mg_limit mapguard src/mapguard.bpf.c
