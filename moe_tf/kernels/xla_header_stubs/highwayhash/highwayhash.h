// See ../README.md: the member type of xla::HighwayHashPrinter, which this project never
// constructs (so its size here does not matter).
#ifndef MOE_TF_XLA_HEADER_STUBS_HIGHWAYHASH_HIGHWAYHASH_H_
#define MOE_TF_XLA_HEADER_STUBS_HIGHWAYHASH_HIGHWAYHASH_H_
namespace highwayhash {
template <unsigned Target>
class HighwayHashCatT {};
}  // namespace highwayhash
#endif  // MOE_TF_XLA_HEADER_STUBS_HIGHWAYHASH_HIGHWAYHASH_H_
