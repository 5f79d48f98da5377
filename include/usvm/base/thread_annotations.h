// Clang thread-safety attributes (-Wthread-safety). Empty under g++.
//
// Every field shared between threads names the lock that guards it:
//   uint64_t seq_ USVM_GUARDED_BY(lock_);
// and functions state what they need:
//   void ZapLocked() USVM_REQUIRES(lock_);
#ifndef USVM_BASE_THREAD_ANNOTATIONS_H_
#define USVM_BASE_THREAD_ANNOTATIONS_H_

#if defined(__clang__)
#define USVM_TSA(x) __attribute__((x))
#else
#define USVM_TSA(x)
#endif

#define USVM_CAPABILITY(x) USVM_TSA(capability(x))
#define USVM_SCOPED_CAPABILITY USVM_TSA(scoped_lockable)
#define USVM_GUARDED_BY(x) USVM_TSA(guarded_by(x))
#define USVM_PT_GUARDED_BY(x) USVM_TSA(pt_guarded_by(x))
#define USVM_ACQUIRED_BEFORE(...) USVM_TSA(acquired_before(__VA_ARGS__))
#define USVM_ACQUIRED_AFTER(...) USVM_TSA(acquired_after(__VA_ARGS__))
#define USVM_REQUIRES(...) USVM_TSA(requires_capability(__VA_ARGS__))
#define USVM_REQUIRES_SHARED(...) USVM_TSA(requires_shared_capability(__VA_ARGS__))
#define USVM_ACQUIRE(...) USVM_TSA(acquire_capability(__VA_ARGS__))
#define USVM_ACQUIRE_SHARED(...) USVM_TSA(acquire_shared_capability(__VA_ARGS__))
#define USVM_RELEASE(...) USVM_TSA(release_capability(__VA_ARGS__))
#define USVM_RELEASE_SHARED(...) USVM_TSA(release_shared_capability(__VA_ARGS__))
#define USVM_RELEASE_GENERIC(...) USVM_TSA(release_generic_capability(__VA_ARGS__))
#define USVM_TRY_ACQUIRE(...) USVM_TSA(try_acquire_capability(__VA_ARGS__))
#define USVM_TRY_ACQUIRE_SHARED(...) USVM_TSA(try_acquire_shared_capability(__VA_ARGS__))
#define USVM_EXCLUDES(...) USVM_TSA(locks_excluded(__VA_ARGS__))
#define USVM_ASSERT_CAPABILITY(x) USVM_TSA(assert_capability(x))
#define USVM_ASSERT_SHARED_CAPABILITY(x) USVM_TSA(assert_shared_capability(x))
#define USVM_RETURN_CAPABILITY(x) USVM_TSA(lock_returned(x))
#define USVM_NO_THREAD_SAFETY_ANALYSIS USVM_TSA(no_thread_safety_analysis)

#endif  // USVM_BASE_THREAD_ANNOTATIONS_H_
