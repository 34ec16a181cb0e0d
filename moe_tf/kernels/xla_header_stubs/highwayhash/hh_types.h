// See ../README.md: xla/printer.h includes this; it needs nothing from it.
#ifndef MOE_TF_XLA_HEADER_STUBS_HIGHWAYHASH_HH_TYPES_H_
#define MOE_TF_XLA_HEADER_STUBS_HIGHWAYHASH_HH_TYPES_H_
#endif  // MOE_TF_XLA_HEADER_STUBS_HIGHWAYHASH_HH_TYPES_H_
