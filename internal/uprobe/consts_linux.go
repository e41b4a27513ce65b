//go:build linux && amd64

package uprobe

import (
	"github.com/mapguard/mapguard/decode"
	"github.com/mapguard/mapguard/internal/wire"
)

// The BPF program's enums (bpf/src/mapguard.h) are the one source of the
// constants the Go side shares with it: bpf2go generates them (-type
// mg_site_flag, mg_key, mg_reg, mg_limit, mg_kind) and each Go constant
// below must equal its generated twin, or this file does not compile (an
// index out of range, or a constant overflow). The Go names exist because
// the site tables that use them also build on other platforms.
var (
	_ = [1]struct{}{}[siteFramed-mapguardMgSiteFlagMG_SITE_FRAMED]
	_ = [1]struct{}{}[siteNilOnly-mapguardMgSiteFlagMG_SITE_NIL_ONLY]
	_ = [1]struct{}{}[siteGrowth-mapguardMgSiteFlagMG_SITE_GROWTH]
	_ = [1]struct{}{}[siteNonNil-mapguardMgSiteFlagMG_SITE_NON_NIL]
	_ = [1]struct{}{}[siteAgg-mapguardMgSiteFlagMG_SITE_AGG]
	_ = [1]struct{}{}[siteStr-mapguardMgSiteFlagMG_SITE_STR]
	_ = [1]struct{}{}[siteErr-mapguardMgSiteFlagMG_SITE_ERR]
	_ = [1]struct{}{}[siteCrash-mapguardMgSiteFlagMG_SITE_CRASH]
	_ = [1]struct{}{}[sitePrinted-mapguardMgSiteFlagMG_SITE_PRINTED]
	_ = [1]struct{}{}[siteBloat-mapguardMgSiteFlagMG_SITE_BLOAT]
	_ = [1]struct{}{}[siteCount-mapguardMgSiteFlagMG_SITE_COUNT]
	_ = [1]struct{}{}[siteWriter-mapguardMgSiteFlagMG_SITE_WRITER]
	_ = [1]struct{}{}[siteDelNil-mapguardMgSiteFlagMG_SITE_DEL_NIL]
	_ = [1]struct{}{}[siteDelIn-mapguardMgSiteFlagMG_SITE_DEL_ENTRY]
	_ = [1]struct{}{}[siteDelDone-mapguardMgSiteFlagMG_SITE_DEL_DONE]
	_ = [1]struct{}{}[siteUnwrap-mapguardMgSiteFlagMG_SITE_UNWRAP]
	_ = [1]struct{}{}[siteWrapped-mapguardMgSiteFlagMG_SITE_WRAPPED]
	_ = [1]struct{}{}[siteCaller-mapguardMgSiteFlagMG_SITE_CALLER]
	_ = [1]struct{}{}[keyNone-mapguardMgKeyMG_KEY_NONE]
	_ = [1]struct{}{}[keyU32-mapguardMgKeyMG_KEY_U32]
	_ = [1]struct{}{}[keyU64-mapguardMgKeyMG_KEY_U64]
	_ = [1]struct{}{}[keyStr-mapguardMgKeyMG_KEY_STR]
	_ = [1]struct{}{}[keyPtr-mapguardMgKeyMG_KEY_PTR]
	_ = [1]struct{}{}[regAX-mapguardMgRegMG_REG_AX]
	_ = [1]struct{}{}[regBX-mapguardMgRegMG_REG_BX]
	_ = [1]struct{}{}[regCX-mapguardMgRegMG_REG_CX]
	_ = [1]struct{}{}[regNone-mapguardMgRegMG_REG_NONE]
	_ = [1]struct{}{}[regHome0-mapguardMgRegMG_REG_HOME0]
	_ = [1]struct{}{}[regHome1-mapguardMgRegMG_REG_HOME1]
	_ = [1]struct{}{}[regDX-mapguardMgRegMG_REG_DX]
	_ = [1]struct{}{}[regSI-mapguardMgRegMG_REG_SI]
	_ = [1]struct{}{}[regDI-mapguardMgRegMG_REG_DI]
	_ = [1]struct{}{}[maxSites-mapguardMgLimitMG_MAX_SITES]
	_ = [1]struct{}{}[wire.MaxFrames-mapguardMgLimitMG_MAX_FRAMES]
	_ = [1]struct{}{}[wire.DetailLen-mapguardMgLimitMG_DETAIL_LEN]
	_ = [1]struct{}{}[len(uprobes{}.ignored)-int(mapguardMgLimitMG_IGNORED)]
)

// The kinds: decode's numbers are the BPF program's enum mg_kind.
var (
	_ = [1]struct{}{}[int(decode.NilMapWrite)-int(mapguardMgKindMG_KIND_NIL_MAP_WRITE)]
	_ = [1]struct{}{}[int(decode.NilMapRead)-int(mapguardMgKindMG_KIND_NIL_MAP_READ)]
	_ = [1]struct{}{}[int(decode.MapGrowth)-int(mapguardMgKindMG_KIND_MAP_GROWTH)]
	_ = [1]struct{}{}[int(decode.MissingKeyRead)-int(mapguardMgKindMG_KIND_MISSING_KEY_READ)]
	_ = [1]struct{}{}[int(decode.UnhashableKey)-int(mapguardMgKindMG_KIND_UNHASHABLE_KEY)]
	_ = [1]struct{}{}[int(decode.MapBloat)-int(mapguardMgKindMG_KIND_MAP_BLOAT)]
	_ = [1]struct{}{}[int(decode.ConcurrentMisuse)-int(mapguardMgKindMG_KIND_CONCURRENT_MISUSE)]
	_ = [1]struct{}{}[int(decode.PreviousCrash)-int(mapguardMgKindMG_KIND_PREVIOUS_CRASH)]
	_ = [1]struct{}{}[int(decode.MissingKeyDelete)-int(mapguardMgKindMG_KIND_MISSING_KEY_DELETE)]
	_ = [1]struct{}{}[int(decode.NilMapDelete)-int(mapguardMgKindMG_KIND_NIL_MAP_DELETE)]
	_ = [1]struct{}{}[int(decode.SharedWriters)-int(mapguardMgKindMG_KIND_SHARED_WRITERS)]
	_ = [1]struct{}{}[int(decode.NestedMapMiss)-int(mapguardMgKindMG_KIND_NESTED_MAP_MISS)]
)
