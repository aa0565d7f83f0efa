/*
 * Session tracker in C: malloc/free churn and a static table.
 *
 * State: a static hash table of 4096 chains (in the data segment) whose entries and key
 * strings are malloc'ed on the heap (wasi-libc's dlmalloc, in linear memory), a static
 * ring of the 512 most recent keys whose evicted copies are freed, and the stack pointer
 * (a non-exported mutable global). It knows nothing about checkpoints.
 *
 * For each record (a key), emits `<key> <hits for that key> <distinct keys> <live bytes>`.
 * Every 1000th record it drops keys seen only once, freeing them.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

__attribute__((import_module("wasnap"), import_name("emit")))
void emit(const char *ptr, size_t len);

#define BUCKETS 4096
#define RECENT 512

struct entry {
    struct entry *next;
    uint64_t hits;
    size_t len;
    char key[];
};

static struct entry *table[BUCKETS];
static char *recent[RECENT];
static size_t recent_next;
static uint64_t records, distinct, live_bytes;
static char *input;
static size_t input_cap;

static uint32_t hash(const char *s, size_t n) {
    uint32_t h = 2166136261u;
    for (size_t i = 0; i < n; i++) h = (h ^ (uint8_t)s[i]) * 16777619u;
    return h;
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

static struct entry *find_or_add(const char *key, size_t len) {
    struct entry **slot = &table[hash(key, len) % BUCKETS];
    for (struct entry *e = *slot; e; e = e->next)
        if (e->len == len && memcmp(e->key, key, len) == 0) return e;
    struct entry *e = malloc(sizeof *e + len);
    memcpy(e->key, key, len);
    e->len = len;
    e->hits = 0;
    e->next = *slot;
    *slot = e;
    distinct++;
    live_bytes += sizeof *e + len;
    return e;
}

static void drop_singletons(void) {
    for (size_t b = 0; b < BUCKETS; b++) {
        struct entry **slot = &table[b];
        while (*slot) {
            struct entry *e = *slot;
            if (e->hits == 1) {
                *slot = e->next;
                live_bytes -= sizeof *e + e->len;
                distinct--;
                free(e);
            } else {
                slot = &e->next;
            }
        }
    }
}

__attribute__((export_name("process")))
void process(char *ptr, size_t len) {
    struct entry *e = find_or_add(ptr, len);
    e->hits++;
    records++;

    /* A copy of every recent key, freed when it falls out of the ring: allocator churn. */
    free(recent[recent_next]);
    recent[recent_next] = strndup(ptr, len);
    recent_next = (recent_next + 1) % RECENT;

    char line[256];
    int n = snprintf(line, sizeof line, "%.*s %llu %llu %llu", (int)(len > 200 ? 200 : len), ptr,
                     (unsigned long long)e->hits, (unsigned long long)distinct,
                     (unsigned long long)live_bytes);
    emit(line, (size_t)n);
    if (records % 1000 == 0) drop_singletons();
}
