/*
 * Word count in C: an open-addressing hash table of words, grown by doubling, with the
 * words themselves in malloc'ed arena blocks (wasi-libc's dlmalloc, in linear memory).
 *
 * State: the table, the arena and the stack pointer (a non-exported mutable global). It
 * knows nothing about checkpoints.
 *
 * For each record it emits `<word> <count so far>` for every space-separated word; every
 * 500th record also emits the vocabulary size.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

__attribute__((import_module("wasnap"), import_name("emit")))
void emit(const char *ptr, size_t len);

struct slot {
    const char *word; /* NULL: empty */
    uint32_t len;
    uint32_t count;
};

static struct slot *table;
static size_t capacity, used;
static char *arena;
static size_t arena_left;
static uint64_t records;
static char *input;
static size_t input_cap;

static uint32_t hash(const char *s, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 16777619u;
    return h;
}

static const char *keep(const char *s, size_t n) {
    if (n > arena_left) {
        arena_left = n > 65536 ? n : 65536;
        arena = malloc(arena_left);
    }
    char *copy = arena;
    memcpy(copy, s, n);
    arena += n;
    arena_left -= n;
    return copy;
}

static struct slot *find(struct slot *t, size_t cap, const char *s, size_t n) {
    for (size_t i = hash(s, n) & (cap - 1);; i = (i + 1) & (cap - 1))
        if (!t[i].word || (t[i].len == n && memcmp(t[i].word, s, n) == 0)) return &t[i];
}

static void grow(void) {
    size_t cap = capacity ? capacity * 2 : 1024;
    struct slot *t = calloc(cap, sizeof *t);
    for (size_t i = 0; i < capacity; i++)
        if (table[i].word) *find(t, cap, table[i].word, table[i].len) = table[i];
    free(table);
    table = t;
    capacity = cap;
}

__attribute__((export_name("alloc")))
char *alloc(size_t len) {
    if (len + 1 > input_cap) {
        free(input);
        input_cap = (len + 1) * 2;
        input = malloc(input_cap);
    }
    return input;
}

__attribute__((export_name("process")))
void process(const char *ptr, size_t len) {
    char line[256];
    records++;
    for (size_t i = 0; i < len;) {
        while (i < len && ptr[i] == ' ') i++;
        size_t start = i;
        while (i < len && ptr[i] != ' ') i++;
        size_t n = i - start;
        if (n == 0) continue;
        if ((used + 1) * 4 > capacity * 3) grow();
        struct slot *s = find(table, capacity, ptr + start, n);
        if (!s->word) {
            s->word = keep(ptr + start, n);
            s->len = (uint32_t)n;
            used++;
        }
        s->count++;
        int m = snprintf(line, sizeof line, "%.*s %u", (int)(n > 200 ? 200 : n), ptr + start, s->count);
        emit(line, (size_t)m);
    }
    if (records % 500 == 0) {
        int m = snprintf(line, sizeof line, "# records=%llu vocabulary=%zu",
                         (unsigned long long)records, used);
        emit(line, (size_t)m);
    }
}
