/* pool: the size-class allocator behind every Lua state. */
#include "unit.h"

#include "pool.h"
#include "sandbox.h"

#include <lauxlib.h>
#include <lua.h>
#include <stdint.h>

/* Fills n bytes at p with a pattern derived from seed. */
static void fill(void *p, size_t n, unsigned seed)
{
    unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        b[i] = (unsigned char)(seed * 31u + i);
}

static int holds(const void *p, size_t n, unsigned seed)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++) {
        if (b[i] != (unsigned char)(seed * 31u + i))
            return 0;
    }
    return 1;
}

START_TEST(test_blocks_are_aligned_distinct_and_keep_their_bytes)
{
    pool *p = pool_new();
    ck_assert_ptr_nonnull(p);
    enum { N = 20000 }; /* several slabs' worth */
    static void *blk[N];
    for (unsigned i = 0; i < N; i++) {
        size_t n = 1 + i % POOL_MAX_BLOCK;
        blk[i] = pool_resize(p, NULL, 0, n);
        ck_assert_ptr_nonnull(blk[i]);
        ck_assert_uint_eq((uintptr_t)blk[i] % 16, 0);
        fill(blk[i], n, i);
    }
    for (unsigned i = 0; i < N; i++)
        ck_assert_msg(holds(blk[i], 1 + i % POOL_MAX_BLOCK, i), "block %u was overwritten", i);
    for (unsigned i = 0; i < N; i++)
        ck_assert_ptr_null(pool_resize(p, blk[i], 1 + i % POOL_MAX_BLOCK, 0));
    pool_free(p);
}
END_TEST

START_TEST(test_a_freed_block_serves_the_next_request_of_its_class)
{
    pool *p = pool_new();
    void *a = pool_resize(p, NULL, 0, 40);
    void *b = pool_resize(p, NULL, 0, 40);
    ck_assert_ptr_nonnull(a);
    ck_assert_ptr_nonnull(b);
    ck_assert_ptr_ne(a, b);
    ck_assert_ptr_null(pool_resize(p, a, 40, 0));
    /* 33..48 bytes share a class */
    ck_assert_ptr_eq(pool_resize(p, NULL, 0, 48), a);
    /* another class does not take it */
    ck_assert_ptr_null(pool_resize(p, b, 40, 0));
    void *c = pool_resize(p, NULL, 0, 64);
    ck_assert_ptr_ne(c, b);
    pool_free(p);
}
END_TEST

START_TEST(test_resizing_keeps_the_bytes_across_classes_and_into_malloc)
{
    pool *p = pool_new();
    char *s = pool_resize(p, NULL, 0, 10);
    fill(s, 10, 7);
    /* within the class: the block stays */
    ck_assert_ptr_eq(pool_resize(p, s, 10, 16), s);
    s = pool_resize(p, s, 16, 200);
    ck_assert_ptr_nonnull(s);
    ck_assert(holds(s, 10, 7));
    fill(s, 200, 8);
    s = pool_resize(p, s, 200, 5000); /* past the pool: malloc */
    ck_assert_ptr_nonnull(s);
    ck_assert(holds(s, 200, 8));
    fill(s, 5000, 9);
    s = pool_resize(p, s, 5000, 100000);
    ck_assert_ptr_nonnull(s);
    ck_assert(holds(s, 5000, 9));
    s = pool_resize(p, s, 100000, 100); /* back into the pool */
    ck_assert_ptr_nonnull(s);
    ck_assert(holds(s, 100, 9));
    s = pool_resize(p, s, 100, 3);
    ck_assert(holds(s, 3, 9));
    ck_assert_ptr_null(pool_resize(p, s, 3, 0));
    pool_free(p);
    pool_free(NULL);
}
END_TEST

START_TEST(test_idle_counts_what_the_pool_keeps_beyond_the_blocks_in_use)
{
    pool *p = pool_new();
    ck_assert_uint_eq(pool_idle(p), 0);
    void *a = pool_resize(p, NULL, 0, 100); /* class of 112 bytes */
    size_t first = pool_idle(p);
    /* the rest of a 64 KiB slab */
    ck_assert_uint_gt(first, 65536 - 112 - 64);
    ck_assert_uint_le(first, 65536 - 112);
    ck_assert_ptr_null(pool_resize(p, a, 100, 0));
    ck_assert_uint_eq(pool_idle(p), first + 112);
    /* blocks past the pool are not its business */
    void *big = pool_resize(p, NULL, 0, 100000);
    ck_assert_uint_eq(pool_idle(p), first + 112);
    ck_assert_ptr_null(pool_resize(p, big, 100000, 0));
    pool_free(p);
}
END_TEST

/* A state keeps the small blocks its garbage freed: its memory, and so the
 * decision to rebuild it, counts them until the state is freed. */
START_TEST(test_a_state_counts_the_freed_blocks_its_pool_keeps)
{
    sandbox *sb = sandbox_new(0);
    ck_assert_ptr_nonnull(sb);
    lua_State *L = sandbox_lua(sb);
    lua_gc(L, LUA_GCCOLLECT);
    size_t base = sandbox_memory(sb);
    ck_assert_int_eq(luaL_loadstring(L, "local t = {}\n"
                                        "for i = 1, 100000 do t[i] = {i} end\n"
                                        "return #t\n"),
                     LUA_OK);
    struct sandbox_limits lim = {64u << 20, 10000000};
    ck_assert_int_eq(sandbox_call(sb, 0, 1, &lim, NULL), SANDBOX_OK);
    ck_assert_int_eq(lua_tointeger(L, -1), 100000);
    lua_pop(L, 1);
    size_t peak = sandbox_memory(sb);
    ck_assert_uint_gt(peak, base + 4000000); /* 100,000 tables of 56 bytes and more */
    lua_gc(L, LUA_GCCOLLECT);
    ck_assert_uint_ge(sandbox_memory(sb), peak - peak / 4);
    sandbox_free(sb);
}
END_TEST

#if defined(__SANITIZE_ADDRESS__)
/* AddressSanitizer reports a read of a freed block (and exits with 1): pooled
 * objects keep the checks malloc's would have. */
START_TEST(test_reading_a_freed_block_is_caught_under_asan)
{
    pool *p = pool_new();
    char *volatile b = pool_resize(p, NULL, 0, 32);
    b[0] = 'x';
    ck_assert_ptr_null(pool_resize(p, b, 32, 0));
    ck_assert_int_ne(b[1], 1);
    pool_free(p);
}
END_TEST
#endif

static Suite *suite(void)
{
    Suite *s = suite_create("pool");
    TCase *tc = tcase_create("pool");
    tcase_set_timeout(tc, 60);
    tcase_add_test(tc, test_blocks_are_aligned_distinct_and_keep_their_bytes);
    tcase_add_test(tc, test_a_freed_block_serves_the_next_request_of_its_class);
    tcase_add_test(tc, test_resizing_keeps_the_bytes_across_classes_and_into_malloc);
    tcase_add_test(tc, test_idle_counts_what_the_pool_keeps_beyond_the_blocks_in_use);
    tcase_add_test(tc, test_a_state_counts_the_freed_blocks_its_pool_keeps);
#if defined(__SANITIZE_ADDRESS__)
    tcase_add_exit_test(tc, test_reading_a_freed_block_is_caught_under_asan, 1);
#endif
    suite_add_tcase(s, tc);
    return s;
}

int main(void)
{
    return unit_run(suite());
}
